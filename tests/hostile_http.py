"""A real HTTP(S) server on loopback that misbehaves on purpose, for the image-fetch tests.

Routes (GET; a query string is ignored, but recorded in `server.requests`):
  /img/<name>          bytes from `server.files[name]`, with Content-Length
  /flaky/<name>        503 for the first `server.failures[name]` requests of it, then as /img/<name>
  /redirect/<name>     302 to `server.redirects[name]`
  /loop                302 to itself, forever
  /status/<code>       that status, empty body
  /trickle             says Content-Length 50 kB, then sends one byte every 50 ms
  /slow-headers        sends the status line, then one header byte every 50 ms
  /endless             no Content-Length, 64 KiB chunks of zeros until the client hangs up
  /declared-huge       Content-Length of 1 TB, then a trickle
  /short-declared/<n>  Content-Length smaller than the file `n` it then sends whole
  /long-declared/<n>   Content-Length larger than file `n`, then closes the connection
  /huge-header         a 100 KiB header line
  /many-headers        200 headers
  /gzip-bomb           Content-Encoding: gzip of 64 MiB of zeros (about 64 KiB on the wire)
"""

from __future__ import annotations

import gzip
import http.server
import socket
import ssl
import threading
import time
from pathlib import Path

TLS_DIR = Path(__file__).resolve().parent / "data" / "tls"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        self.server.times.append((self.path, time.time()))
        route, _, arg = self.path.lstrip("/").partition("?")[0].partition("/")  # a query is not routed on
        try:
            getattr(self, "route_" + route.replace("-", "_"), self.route_missing)(arg)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass  # the client hung up: the point of most routes here

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_missing(self, _arg: str) -> None:
        self._send(404, b"not found")

    def route_img(self, name: str) -> None:
        body = self.server.files.get(name)
        if body is None:
            return self.route_missing(name)
        self._send(200, body, {"Content-Type": "image/png"})

    def route_flaky(self, name: str) -> None:
        with self.server.lock:
            failing = self.server.failures.get(name, 0) > 0
            if failing:
                self.server.failures[name] -= 1
        if failing:
            return self._send(503, b"unavailable")
        self.route_img(name)

    def route_redirect(self, name: str) -> None:
        self._send(302, headers={"Location": self.server.redirects[name]})

    def route_loop(self, _arg: str) -> None:
        self._send(302, headers={"Location": "/loop"})

    def route_status(self, code: str) -> None:
        self._send(int(code))

    def _trickle(self) -> None:
        while not self.server.stopping.is_set():
            self.wfile.write(b"\x00")
            self.wfile.flush()
            time.sleep(0.05)

    def route_trickle(self, _arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(50_000))  # under any byte limit: only the clock stops it
        self.end_headers()
        self._trickle()

    def route_slow_headers(self, _arg: str) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        while not self.server.stopping.is_set():
            self.wfile.write(b"X")
            self.wfile.flush()
            time.sleep(0.05)

    def route_endless(self, _arg: str) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        zeros = bytes(64 * 1024)
        while not self.server.stopping.is_set():
            self.wfile.write(zeros)

    def route_declared_huge(self, _arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self._trickle()

    def route_short_declared(self, name: str) -> None:
        body = self.server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) // 4))
        self.end_headers()
        self.wfile.write(body)

    def route_long_declared(self, name: str) -> None:
        body = self.server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) * 2))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def route_huge_header(self, _arg: str) -> None:
        self.send_response(200)
        self.send_header("X-Huge", "a" * 100_000)
        self.end_headers()

    def route_many_headers(self, _arg: str) -> None:
        self.send_response(200)
        for index in range(200):
            self.send_header(f"X-Header-{index}", "v")
        self.end_headers()

    def route_gzip_bomb(self, _arg: str) -> None:
        self._send(200, self.server.gzip_bomb, {"Content-Encoding": "gzip", "Content-Type": "image/png"})


class HostileServer(http.server.ThreadingHTTPServer):
    """Serves the routes above on 127.0.0.1; `tls=True` serves HTTPS with a certificate for `localhost`."""

    daemon_threads = True

    def __init__(self, tls: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.times: list[tuple[str, float]] = []
        """(path, time.time()) of each request, in order."""
        self.failures: dict[str, int] = {}
        """/flaky/<name>: how many more requests of it answer 503."""
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.gzip_bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9)
        self.scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(TLS_DIR / "localhost-chain.pem")
            self.socket = context.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request: socket.socket | tuple, client_address: object) -> None:
        pass  # clients that hang up mid-response are expected here
