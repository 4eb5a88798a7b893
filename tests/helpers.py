"""Shared test helpers: building projects on the embedded platform and reading outcomes back."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
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


BIN = Path(sys.executable).parent  # this venv's console scripts (totask-ray, ray)


def cli_env(platform: Any, **extra: str) -> dict[str, str]:
    """The environment a user's shell gives `totask-ray` / `ray`: the platform in the SYNAPSE_*
    variables, no stray RAY_ADDRESS, this venv first on PATH (as when it is activated)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SYNAPSE_"))}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        SYNAPSE_HOST=platform.url,
        SYNAPSE_ACCESS_TOKEN=platform.token,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    )
    return env


@dataclass(frozen=True)
class RayHead:
    gcs: str  # host:port for `--address` of a driver
    dashboard: str  # http URL for `ray job ...`
    port: int


@contextmanager
def ray_head(env: dict[str, str], name: str) -> Iterator[RayHead]:
    """A `ray start --head` cluster of 2 CPUs on loopback ports of its own, stopped afterwards."""
    gcs_port, dash_port, agent_http, agent_grpc, metrics = (free_port() for _ in range(5))
    temp = Path("/tmp") / f"{name}{gcs_port}"  # a short path: unix socket names are limited
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--disable-usage-stats", f"--temp-dir={temp}",
         # another cluster (the suite's) may hold the default agent ports on this machine
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(dash_port)
        yield RayHead(gcs=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}", port=gcs_port)
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def job_submit(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`ray job submit ARGS`, retried while the dashboard's job agent is still starting ("No
    available agent": the submission is refused before a job exists, so retrying is safe)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", *args], env=env, capture_output=True, text=True, timeout=300
        )
        if proc.returncode == 0 or "No available agent" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(2)
