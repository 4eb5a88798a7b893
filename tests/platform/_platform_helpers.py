"""Helpers for the embedded platform's tests (a plainly named module: `conftest` is ambiguous)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from totask_ray.embedded.server import bind_socket


def follow_pages(
    c: httpx.Client, params: dict | list, path: str = "/sdk/tasks/"
) -> tuple[list[int], list[dict]]:
    """Every id over all pages (following `next` as given) and every page's JSON."""
    pages = []
    r = c.get(path, params=params)
    while True:
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append(page)
        if page["next"] is None:
            break
        r = c.get(page["next"])
    return [t["id"] for p in pages for t in p["results"]], pages


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields its URL."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and th.is_alive(), "in-thread server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
        sock.close()
