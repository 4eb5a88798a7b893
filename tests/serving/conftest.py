"""Fixtures for the serving tests: a loopback image server (Serve itself: tests/conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class ImageServer:
    """Serves registered byte blobs at http://127.0.0.1:<port>/<name> (loopback only)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                entry = files.get(self.path.lstrip("/"))
                if entry is None:
                    self.send_error(404)
                    return
                body, ctype = entry
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, name: str, body: bytes, content_type: str = "image/png") -> str:
        self.files[name] = (body, content_type)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
