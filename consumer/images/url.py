"""Image URLs: checked and taken apart, their addresses judged, what is shown of them redacted (the fetch
itself, within one deadline: consumer/images/fetch.py).

http and https only. The host is resolved once; every address it resolves to must be public (not
loopback, private, CGNAT, link-local, multicast, reserved or unspecified, v4 or v6, embedded v4 forms
judged by their v4 part) unless the host is listed in IMAGE_ALLOWED_HOSTS. The connection goes to the
checked address (no second lookup that DNS rebinding could answer differently), TLS verifies the
certificate against the URL's host name, each redirect (at most 3) is checked the same way, and
IMAGE_FETCH_TIMEOUT bounds the whole fetch - connect, headers and a body trickled one byte at a time -
because a watchdog shuts the socket when it runs out. IMAGE_MAX_BYTES is enforced while streaming.

Name resolution is inside that deadline too: the lookup runs on a thread of its own and is waited for
with what is left of IMAGE_FETCH_TIMEOUT; a lookup still running then is abandoned (its thread ends
when the system resolver gives up, its answer is discarded) and the fetch fails as a timeout.
`UrlFetcher.resolve_host` is the seam for that lookup (tests make it slow).

A URL must be valid Unicode: one with a lone surrogate ("\\ud800" is valid JSON) anywhere - host,
path, query, userinfo or fragment - is refused as `bad_url` before anything is sent, since it has no
UTF-8 form to percent-encode.

Secrets: a URL shown in an error message or a log line (messages become dead-letter headers) always
goes through `redact_url`, which drops the userinfo and every query value, keeping parameter names,
and drops the fragment. Text from the HTTP stack is scrubbed of those parts as well. A secret in the
path itself (a token as a path segment) cannot be told from a file name and is shown.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote, unquote_plus, urlsplit

from consumer.errors import FetchError
from consumer.images.shown import printable

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
MAX_URL_CHARS = 8192
MAX_SHOWN_URL_CHARS = 200
"""A URL in a message or log line is cut to this many characters (after `redact_url`)."""
REDACTED = "***"
CONNECT_TIMEOUT_S = 5.0
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
# Characters left as they are when a path or query is percent-encoded for the request line: the
# reserved set plus '%', so an already-encoded URL is sent unchanged and only unsafe ones are encoded.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
# NAT64's well-known prefix carries a v4 address in its last 32 bits (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class UrlTarget:
    """A URL taken apart for one request: what to resolve, where to connect, what to send."""

    url: str
    scheme: str
    host: str
    """The host name as DNS, TLS and IMAGE_ALLOWED_HOSTS see it: lower-case, ASCII (IDNA), no brackets."""
    port: int
    request_path: str
    host_header: str


def address_is_public(address: str) -> bool:
    """True for a globally routable unicast address.

    Forms that carry an IPv4 address inside IPv6 (mapped ::ffff:a.b.c.d, 6to4 2002::/16, NAT64
    64:ff9b::/96) are judged by that IPv4 address, so none of them is a way to reach 127.0.0.1.
    """
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.is_site_local:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip.is_link_local)


def redact_url(url: str) -> str:
    """The URL as messages and logs show it: no userinfo, no query values, no fragment.

    `http://user:pw@host/a.png?X-Amz-Signature=abc&v#t` becomes `http://***@host/a.png?X-Amz-Signature=***&***`:
    the userinfo is replaced by `***`, each query value by `***` with its name kept (a name without
    `=` is a value and is replaced whole), the fragment is dropped. Parameter names are kept because
    they say what kind of URL it was (pre-signed, versioned) and are not secrets in any signing
    scheme we know of. The parts are the ones `urlsplit` finds, as the fetcher uses them; what
    `urlsplit` cannot split keeps only its scheme and host. Non-printable characters are escaped and
    the result is at most MAX_SHOWN_URL_CHARS characters, so it is always valid UTF-8."""
    try:
        parts = urlsplit(url)
    except ValueError:
        scheme, separator, rest = url.partition("://")
        authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
        shown = f"{scheme}://{_redact_authority(authority)}/..." if separator else "(unparseable URL)"
        return printable(shown, MAX_SHOWN_URL_CHARS)
    shown = f"{parts.scheme}:" if parts.scheme else ""
    if parts.netloc or url[len(shown) :].startswith("//"):
        shown += "//" + _redact_authority(parts.netloc)
    shown += parts.path
    if parts.query:
        shown += "?" + "&".join(_redact_parameter(parameter) for parameter in parts.query.split("&"))
    return printable(shown, MAX_SHOWN_URL_CHARS)


def _redact_authority(authority: str) -> str:
    _userinfo, at, host = authority.rpartition("@")
    return f"{REDACTED}@{host}" if at else authority


def _redact_parameter(parameter: str) -> str:
    name, equals, _value = parameter.partition("=")
    return f"{name}={REDACTED}" if equals else REDACTED


def url_secrets(url: str) -> list[str]:
    """The parts of `url` that `redact_url` hides, as they may appear in other text: raw,
    percent-decoded and percent-encoded. Parts shorter than 4 characters are left out, since
    removing every "a" or "1" from a message would garble it and hide nothing."""
    try:
        parts: SplitResult | None = urlsplit(url)
    except ValueError:
        parts = None
    hidden: list[str] = []
    if parts is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        hidden += [userinfo, *userinfo.split(":", 1), parts.fragment]
        for parameter in parts.query.split("&") if parts.query else []:
            name, equals, value = parameter.partition("=")
            hidden.append(value if equals else name)
    else:
        hidden += [url.partition("://")[2].split("/", 1)[0].rpartition("@")[0], url.partition("?")[2]]
    found: list[str] = []
    for secret in hidden:
        for form in (secret, unquote(secret, errors="replace"), unquote_plus(secret, errors="replace")):
            for variant in (form, quote(form, safe="", errors="backslashreplace")):
                if len(variant) >= 4 and variant not in found:
                    found.append(variant)
    return sorted(found, key=len, reverse=True)  # longest first, so a part of a secret never stays behind


def scrub(text: str, urls: Iterable[str]) -> str:
    """`text` with every secret part of each URL (see `url_secrets`) replaced by ***."""
    for url in urls:
        for secret in url_secrets(url):
            text = text.replace(secret, REDACTED)
    return text


def parse_image_url(url: str) -> UrlTarget:
    """Check and take apart an image URL; every problem is a `FetchError` (`bad_url`/`bad_scheme`)."""
    shown = redact_url(url)
    if not _is_valid_unicode(url):
        raise FetchError(
            f"image.url {shown} contains a lone UTF-16 surrogate, which is not valid Unicode and has no "
            "UTF-8 form to send; percent-encode the bytes meant",
            reason="bad_url",
        )
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname
    except ValueError as exc:
        raise FetchError(f"image.url {shown} is not a valid URL: {exc}", reason="bad_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        hint = " (inline images go in image.base64)" if scheme == "data" else ""
        raise FetchError(
            f"image.url must be http:// or https://, got {printable(scheme, 20) or 'no'} scheme in {shown}{hint}",
            reason="bad_scheme",
        )
    # urlsplit drops tabs and line breaks silently; a request line must not carry them at all.
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise FetchError(
            f"image.url {shown} contains whitespace or control characters; percent-encode them", reason="bad_url"
        )
    if len(url) > MAX_URL_CHARS:
        raise FetchError(f"image.url is {len(url)} characters, over {MAX_URL_CHARS}", reason="bad_url")
    if not hostname:
        raise FetchError(f"image.url {shown} has no host", reason="bad_url")
    try:
        host = hostname if _is_ip(hostname) else hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError(
            f"image.url host {printable(hostname, 100)!r} is not a valid host name", reason="bad_url"
        ) from None
    if port == 0:
        raise FetchError(f"image.url {shown} has port 0", reason="bad_url")
    default_port = 443 if scheme == "https" else 80
    bracketed = f"[{host}]" if ":" in host else host
    request_path = quote(parts.path or "/", safe=_URL_SAFE)
    if parts.query:
        request_path += "?" + quote(parts.query, safe=_URL_SAFE)
    return UrlTarget(
        url=url,
        scheme=scheme,
        host=host.lower(),
        port=port or default_port,
        request_path=request_path,
        host_header=bracketed if port is None else f"{bracketed}:{port}",
    )


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
