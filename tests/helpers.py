"""Shared test helpers: building projects on the embedded platform and reading outcomes back."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from totask_ray.platform.synapse.client import SynapseConfig

SPECS = [
    {"name": "image_1", "is_primary": True, "file_type": "image"},
    {"name": "annotation_data", "is_primary": False, "file_type": "json"},
]


def config_for(platform: Any, **kw: Any) -> SynapseConfig:
    return SynapseConfig(host=platform.url, access_token=platform.token, **kw)


def write_media(platform: Any, rel: str, content: bytes | str | Any) -> str:
    path = Path(platform.media_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    elif not isinstance(content, bytes):
        content = json.dumps(content).encode()
    path.write_bytes(content)
    return rel


def make_project(platform: Any, units: list[Mapping[str, Any]], *, specs: list[dict] | None = None,
                 with_collection: bool = True) -> tuple[int, list[int]]:  # fmt: skip
    """A project whose tasks each get the data unit described by one item of `units`:
    `{"files": {spec: {"path"|"url": ...}}, "status": ..., "assignee": ..., "data": ...}`;
    an item with `"files": None` makes a task without a data unit."""
    store = platform.store
    if not with_collection:
        return store.create_project("no collection"), []
    dc = store.create_data_collection("test collection", specs or SPECS)
    project = store.create_project("test project", dc)
    rows = []
    for u in units:
        du = None if u.get("files") is None else store.create_data_unit(dc, u["files"])
        rows.append(
            {
                "data_unit": du,
                "status": u.get("status", "pending"),
                "assignee": u.get("assignee"),
                "data": u.get("data"),
            }
        )
    return project, store.create_tasks_bulk(project, rows)


def good_unit(platform: Any, i: int, prefix: str = "t") -> dict[str, Any]:
    ann = {"objects": [{"id": f"o{i}", "class_id": 1, "type": "bbox",
                        "coordinates": {"x": i, "y": 1, "width": 5, "height": 5}, "properties": {"label": "x"}}]}  # fmt: skip
    rel = write_media(platform, f"{prefix}/ann_{i}.json", ann)
    img = write_media(platform, f"{prefix}/img.png", b"\x89PNG\r\n\x1a\n")
    return {"files": {"image_1": {"path": img}, "annotation_data": {"path": rel}}, "expected": ann}


def read_report(path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert rec["task_id"] not in out, f"task {rec['task_id']} has two outcomes in the report"
        out[rec["task_id"]] = rec
    return out


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes, dict[str, str]]] = {}

    def do_GET(self) -> None:
        status, ctype, body, headers = self.routes.get(
            self.path.split("?")[0], (404, "text/plain", b"nope", {})
        )
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def file_server(routes: dict[str, tuple[int, str, bytes, dict[str, str]]]) -> Iterator[str]:
    """A loopback HTTP server answering fixed routes (404 for the rest): a second host for file URLs."""
    handler = type("H", (_Handler,), {"routes": routes})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Until something listens on the loopback port (a `ray start` dashboard, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {port}")
