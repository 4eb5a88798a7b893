"""What the Label Studio tests share beyond fixtures: the media host they serve files from."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Media(BaseHTTPRequestHandler):
    """Serves `files` by path; records the auth it was sent; holds each answer `delay_s` (a test's
    slow network: Label Studio has no fault injection to slow the run down)."""

    files: dict[str, tuple[str, bytes]] = {}
    auth_seen: list[str | None] = []
    delay_s = 0.0

    def do_GET(self) -> None:
        type(self).auth_seen.append(self.headers.get("Authorization"))
        if type(self).delay_s:
            time.sleep(type(self).delay_s)  # the slow network being simulated, not a wait in a test
        ctype, body = self.files.get(self.path.split("?")[0], ("text/plain", b""))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def media_host(delay_s: float = 0.0) -> Iterator[tuple[str, type[Media]]]:
    """A loopback host for images and annotation files, and its handler class (set `files`)."""
    handler = type("M", (Media,), {"files": {}, "auth_seen": [], "delay_s": delay_s})
    # a listen backlog of 5 (the default) makes a burst of connections wait for SYN retries
    server = type("S", (ThreadingHTTPServer,), {"request_queue_size": 256})(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
