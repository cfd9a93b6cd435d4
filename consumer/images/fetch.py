"""Fetching an image URL within one deadline: resolved once (inside the deadline), checked, connected
to the checked address, redirects followed and checked again, the body streamed under the byte cap.
consumer/images/url.py takes URLs apart, judges addresses and redacts what is shown.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urljoin

import urllib3
from urllib3.util.ssl_match_hostname import CertificateError as _HostnameMismatch

from consumer.errors import FetchError
from consumer.images.shown import printable
from consumer.images.url import (
    _CHUNK,
    CONNECT_TIMEOUT_S,
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    UrlTarget,
    address_is_public,
    parse_image_url,
    redact_url,
    scrub,
)

logger = logging.getLogger(__name__)


class _Deadline:
    """The whole fetch's time budget. When it runs out, the socket being read is shut down, which
    wakes a blocked read at once however slowly the server is trickling bytes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(self.expires_at - time.monotonic(), 0.001)

    def watch(self, connection: http.client.HTTPConnection | None) -> None:
        with self._lock:
            self._connection = connection

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sock = getattr(self._connection, "sock", None)
        if sock is not None:
            try:
                # The plain socket method: SSLSocket.shutdown would also drop its TLS state under
                # the reading thread's feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


Resolve = Callable[[str, int], list[str]]
"""A name lookup: (host, port) -> the addresses it resolves to, raising `socket.gaierror` (or another
OSError) when it cannot. `system_resolve` is the real one."""


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to for a TCP connection, from the system resolver (getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class UrlFetcher:
    """GETs image URLs within the limits it is given. Thread-safe."""

    def __init__(
        self,
        max_bytes: int,
        fetch_timeout: float,
        allowed_hosts: frozenset[str],
        resolve_host: Resolve = system_resolve,
    ) -> None:
        self.max_bytes = max_bytes
        self.fetch_timeout = fetch_timeout
        self.allowed_hosts = allowed_hosts
        self.resolve_host = resolve_host
        """The name lookup, run inside the fetch deadline; a seam for tests that need slow DNS."""

    def fetch(self, url: str) -> bytes:
        """GET the image, following at most MAX_REDIRECTS redirects, each one checked like the first."""
        visited = [url]
        try:
            with _Deadline(self.fetch_timeout) as deadline:
                for hop in range(MAX_REDIRECTS + 1):
                    try:
                        location = self._fetch_once(visited[-1], deadline)
                    except FetchError as error:
                        if hop:
                            error.message = f"{error.message} (reached by redirect from {redact_url(url)})"
                        raise
                    if isinstance(location, bytes):
                        return location
                    visited.append(location)
            raise FetchError(
                f"more than {MAX_REDIRECTS} redirects fetching {redact_url(url)}", reason="too_many_redirects"
            )
        except FetchError as error:
            # Messages are built from redacted URLs; this also catches a secret echoed by the HTTP stack.
            error.message = scrub(error.message, visited)
            error.args = (error.message,)
            raise

    def _fetch_once(self, url: str, deadline: _Deadline) -> bytes | str:
        """One request: the body, or the absolute URL a redirect points to."""
        target = parse_image_url(url)
        addresses = self._checked_addresses(target, deadline)
        connection = None
        try:
            connection = self._connect(target, addresses, deadline)
            connection.request(
                "GET",
                target.request_path,
                headers={
                    "Host": target.host_header,
                    "Accept": "image/*",
                    "Accept-Encoding": "identity",
                    "User-Agent": "diagram-consumer",
                },
                preload_content=False,
                decode_content=False,
            )
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES and response.headers.get("Location"):
                return urljoin(url, response.headers["Location"])
            if response.status >= 400:
                retryable = response.status >= 500 or response.status in (408, 429)
                raise FetchError(
                    f"image URL {redact_url(url)} answered HTTP {response.status}",
                    reason=f"http_{response.status}",
                    retryable=retryable,
                )
            body = self._read_body(target, response)
            if deadline.expired:  # the watchdog ended the body early: it is cut short, not complete
                raise self._timeout(target)
            return body
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - http.client, ssl and urllib3 raise a zoo; each maps below
            raise self._network_error(target, exc, deadline) from None
        finally:
            deadline.watch(None)
            if connection is not None:
                connection.close()

    def _checked_addresses(self, target: UrlTarget, deadline: _Deadline) -> list[str]:
        """Resolve the host once; refuse it if any address is not public, unless the host is allowed."""
        try:
            addresses = list(dict.fromkeys(self._lookup(target, deadline)))
        except socket.gaierror as exc:
            raise FetchError(
                f"cannot resolve image host {target.host!r}: {exc.strerror}",
                reason="dns",
                retryable=exc.errno == socket.EAI_AGAIN,
            ) from None
        except (UnicodeError, ValueError, OSError) as exc:
            raise FetchError(f"cannot resolve image host {target.host!r}: {exc}"[:500], reason="dns") from None
        if target.host not in self.allowed_hosts:
            private = [address for address in addresses if not address_is_public(address)]
            if private:
                raise FetchError(
                    f"image host {target.host!r} resolves to a non-public address ({private[0]}); "
                    "add it to IMAGE_ALLOWED_HOSTS if it is a trusted internal image server",
                    reason="forbidden_address",
                )
        return addresses

    def _lookup(self, target: UrlTarget, deadline: _Deadline) -> list[str]:
        """`resolve_host` on a thread of its own, waited for no longer than the deadline allows: a
        thread in getaddrinfo cannot be interrupted, so one that outlives the fetch is abandoned."""
        answer: list[list[str] | BaseException] = []
        done = threading.Event()

        def lookup() -> None:
            try:
                answer.append(self.resolve_host(target.host, target.port))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which maps it
                answer.append(exc)
            finally:
                done.set()

        threading.Thread(target=lookup, name=f"dns-{target.host[:40]}", daemon=True).start()
        if not done.wait(deadline.remaining()) or deadline.expired:
            raise FetchError(
                f"resolving image host {target.host!r} took over IMAGE_FETCH_TIMEOUT={self.fetch_timeout:g} s",
                reason="timeout",
                retryable=True,
            )
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[0]

    def _connect(
        self, target: UrlTarget, addresses: list[str], deadline: _Deadline
    ) -> urllib3.connection.HTTPConnection:
        """Connect to the first checked address that answers; TLS checks the URL's host name."""
        last_error: Exception | None = None
        for address in addresses:
            timeout = min(deadline.remaining(), CONNECT_TIMEOUT_S)
            connection: urllib3.connection.HTTPConnection
            if target.scheme == "https":
                connection = urllib3.connection.HTTPSConnection(
                    address,
                    target.port,
                    timeout=timeout,
                    cert_reqs="CERT_REQUIRED",
                    server_hostname=target.host,
                    assert_hostname=target.host,
                )
            else:
                connection = urllib3.connection.HTTPConnection(address, target.port, timeout=timeout)
            deadline.watch(connection)
            try:
                connection.connect()
            except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as exc:
                connection.close()
                last_error = exc
                if deadline.expired:
                    break
                continue  # the next checked address, as a browser would
            except (ssl.SSLError, ssl.CertificateError, urllib3.exceptions.SSLError, _HostnameMismatch) as exc:
                connection.close()
                if deadline.expired:
                    raise self._timeout(target) from None
                raise FetchError(
                    f"TLS with image host {target.host!r} failed (its certificate must be valid for that "
                    f"name and trusted by this service): {exc}"[:500],
                    reason="tls",
                ) from None
            if connection.sock is not None:
                connection.sock.settimeout(deadline.remaining())
            if deadline.expired:
                connection.close()
                raise self._timeout(target)
            return connection
        raise self._network_error(target, last_error or OSError("no address to connect to"), deadline)

    def _read_body(self, target: UrlTarget, response: urllib3.BaseHTTPResponse) -> bytes:
        limit = self.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise FetchError(
                f"image at {redact_url(target.url)} is {printable(declared, 30)} bytes (Content-Length), "
                f"over IMAGE_MAX_BYTES={limit}",
                reason="too_large",
            )
        body = bytearray()
        for chunk in response.stream(_CHUNK, decode_content=False):
            body += chunk
            if len(body) > limit:  # whatever Content-Length said
                raise FetchError(
                    f"image at {redact_url(target.url)} is over IMAGE_MAX_BYTES={limit} bytes", reason="too_large"
                )
        return bytes(body)

    def _timeout(self, target: UrlTarget) -> FetchError:
        return FetchError(
            f"fetching {redact_url(target.url)} took over IMAGE_FETCH_TIMEOUT={self.fetch_timeout:g} s",
            reason="timeout",
            retryable=True,
        )

    def _network_error(self, target: UrlTarget, exc: BaseException, deadline: _Deadline) -> FetchError:
        """Map what the HTTP stack raised to a FetchError; a watchdog shutdown reads as a timeout."""
        if deadline.expired or isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError)):
            return self._timeout(target)
        if isinstance(exc, http.client.HTTPException) and not isinstance(exc, ConnectionError):
            # Lines over 64 KiB, more than 100 headers, a status line that is not HTTP.
            return FetchError(
                f"image host {target.host!r} sent a malformed HTTP response: {type(exc).__name__}: {exc}"[:500],
                reason="bad_response",
            )
        if isinstance(exc, (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException)):
            return FetchError(
                f"connection to image host {target.host!r} failed: {exc}"[:500], reason="connection", retryable=True
            )
        shown_error = printable(scrub(f"{type(exc).__name__}: {exc}", [target.url]), 300)
        logger.warning("unexpected error fetching %s: %s", redact_url(target.url), shown_error)
        return FetchError(f"fetching {redact_url(target.url)} failed: {shown_error}", reason="bad_response")
