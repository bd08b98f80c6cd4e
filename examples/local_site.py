"""A local website for the HTTP examples: keep-alive HTTP/1.1 on 127.0.0.1, with counters.

It counts what a client cannot hide: TCP connections opened and closed, requests, and
the most requests it was serving at the same moment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LocalSite", "SiteCounters"]


@dataclass(frozen=True)
class SiteCounters:
    """What the site has seen so far."""

    connections: int
    closed: int
    requests: int
    peak_in_flight: int


class LocalSite:
    """Serve ``pages`` (path to HTML) on a free port until :meth:`close`.

    Each response takes ``latency`` seconds, like a real server would; unknown paths are
    404. Use it as a context manager::

        with LocalSite({"/": "<title>Home</title>"}) as site:
            print(site.url("/"))
    """

    def __init__(self, pages: Mapping[str, str], latency: float = 0.0) -> None:
        self.pages = dict(pages)
        self.latency = latency
        self._lock = threading.Lock()
        self._connections = 0
        self._closed = 0
        self._requests = 0
        self._in_flight = 0
        self._peak = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="local-site", daemon=True)

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return f"{self.origin}{path}"

    def counters(self) -> SiteCounters:
        with self._lock:
            return SiteCounters(self._connections, self._closed, self._requests, self._peak)

    def reset_peak(self) -> None:
        """Start measuring peak concurrency afresh."""
        with self._lock:
            self._peak = self._in_flight

    def wait_until_closed(self, timeout: float) -> SiteCounters:
        """Wait until every connection opened so far was closed by its client."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counters = self.counters()
            if counters.closed >= counters.connections:
                return counters
            time.sleep(0.02)
        return self.counters()

    def __enter__(self) -> LocalSite:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- called by the request handler -------------------------------------------------

    def _opened(self) -> None:
        with self._lock:
            self._connections += 1

    def _finished(self) -> None:
        with self._lock:
            self._closed += 1

    def _serve(self, path: str) -> tuple[int, bytes]:
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            page = self.pages.get(path)
            if page is None:
                return 404, b"<title>Not found</title>"
            return 200, page.encode()
        finally:
            with self._lock:
                self._in_flight -= 1


def _handler_for(site: LocalSite) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1: the connection stays open between requests unless a side closes it.
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            site._opened()

        def finish(self) -> None:
            super().finish()
            site._finished()

        def do_GET(self) -> None:
            status, body = site._serve(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the examples print what matters themselves

    return Handler
