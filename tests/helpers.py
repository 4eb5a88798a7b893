"""Shared test helpers: building projects on the embedded platform and reading outcomes back."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx

from devtools.ports import quiet_port
from totask_ray.platform.synapse.client import SynapseConfig

REPO = Path(__file__).resolve().parents[1]  # the repository's root

SPECS = [
    {"name": "image_1", "is_primary": True, "file_type": "image"},
    {"name": "annotation_data", "is_primary": False, "file_type": "json"},
]


T = TypeVar("T")


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


def png(image: Any) -> bytes:
    """PNG bytes of an HxWx3 uint8 array."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def faces_config(version: str, **changes: Any) -> dict[str, Any]:
    """The faces pre-processor's release config (serve_apps/faces) at `version`, with `changes` set by
    dotted path ("actions.inference.required_resources.required_gpu_count": 4)."""
    from totask_ray.serving.config import load_release_config

    cfg = load_release_config(str(Path(__file__).resolve().parents[1] / "serve_apps" / "faces"))
    out = cfg.model_dump(mode="json", exclude_none=True)
    out["version"] = version
    for path, value in changes.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def faces_release(platform: Any, version: str = "1.0.0", **changes: Any) -> int:
    """A plugin release of the faces pre-processor on the platform (its app: faces@VERSION)."""
    return platform.store.create_plugin_release("faces", version, faces_config(version, **changes))


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


def wait_until(condition: Callable[[], T], what: str, timeout: float, interval: float = 0.1) -> T:
    """Poll `condition` until it returns something truthy, and return that; after `timeout`
    seconds raise a TimeoutError that says what was waited for and what the condition last gave."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}; last seen: {value!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Until something listens on the loopback port (a `ray start` dashboard, say)."""
    wait_until(lambda: listening(port), f"a server listening on 127.0.0.1:{port}", timeout, interval=0.2)


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


AGENT_HTTP_FAILED = "Failed to start HTTP server"  # Ray's dashboard agent, when its HTTP port is taken


@dataclass(frozen=True)
class RayHead:
    gcs: str  # host:port for `--address` of a driver
    dashboard: str  # http URL for `ray job ...`
    port: int
    agent_port: int  # the job agent's HTTP port: `ray job submit` goes through it
    logs: Path  # the head's session logs

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / name
        text = path.read_text(errors="replace") if path.exists() else f"({path} does not exist)\n"
        return f"--- {name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def diagnosis(self) -> str:
        return "\n".join(self.log_tail(n) for n in ("dashboard_agent.log", "dashboard.log", "raylet.out"))


def _agent_ready(head: RayHead, proc: subprocess.Popen) -> bool:
    """The job agent serves HTTP, or an error that says why it never will."""
    if proc.poll() is not None:
        raise RuntimeError(f"`ray start --head` exited with {proc.returncode}\n{head.diagnosis()}")
    agent_log = head.logs / "dashboard_agent.log"
    if agent_log.exists() and AGENT_HTTP_FAILED in agent_log.read_text(errors="replace"):
        raise RuntimeError(f"the job agent could not serve HTTP on {head.agent_port}\n{head.diagnosis()}")
    return listening(head.agent_port)


@contextmanager
def ray_head(env: dict[str, str], name: str, timeout: float = 120.0) -> Iterator[RayHead]:
    """A `ray start --head` cluster of 2 CPUs on loopback ports of its own, stopped afterwards.

    It is handed over once its job agent serves HTTP: until then `ray job submit` is refused with
    "No available agent". The ports come from `quiet_port()`, so no Ray component takes another's.
    """
    gcs_port, dash_port, agent_http, agent_grpc, metrics = _distinct_ports(5)
    temp = Path("/tmp") / f"{name}{gcs_port}"  # a short path: unix socket names are limited
    head_proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--disable-usage-stats", f"--temp-dir={temp}",
         # another cluster (the suite's) may hold the default agent ports on this machine
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    head = RayHead(
        gcs=f"127.0.0.1:{gcs_port}",
        dashboard=f"http://127.0.0.1:{dash_port}",
        port=gcs_port,
        agent_port=agent_http,
        logs=temp / "session_latest" / "logs",
    )
    try:
        try:
            wait_until(
                lambda: listening(dash_port) and _agent_ready(head, head_proc),
                f"the head's dashboard (:{dash_port}) and job agent (:{agent_http}) to serve HTTP",
                timeout,
                interval=0.2,
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{head.diagnosis()}") from None
        yield head
    finally:
        head_proc.terminate()
        try:
            head_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head_proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:  # two draws of one port are rare: this ends after n draws or so
        ports.add(quiet_port())
    return list(ports)


def job_submit(
    head: RayHead, args: list[str], env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess:
    """`ray job submit --address=HEAD ARGS`. A submission refused with "No available agent" (no job
    exists yet, so it is safe to repeat) is repeated until `timeout` seconds have passed; then the
    last answer is returned with the head's agent log appended, for the assertion to show."""
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address={head.dashboard}", *args],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode == 0 or "No available agent" not in proc.stderr:
            return proc
        if time.monotonic() > deadline:
            proc.stderr += f"\n[still no job agent after {timeout:.0f} s]\n{head.diagnosis()}"
            return proc
        time.sleep(1)


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


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields its URL."""
    import uvicorn

    from totask_ray.embedded.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    wait_until(lambda: server.started or not th.is_alive(), "the in-thread uvicorn server to start", 10)
    assert th.is_alive(), "the in-thread uvicorn server exited before it started"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
        sock.close()


def face_jpegs(n: int, seed: int) -> list[tuple[bytes, list[list[float]], tuple[int, int]]]:
    """`n` JPEGs from the faces demo (the last has no face): each with its truth boxes and size."""
    import io

    from totask_ray.embedded.seeds.faces import _compose_faces, _face_patch

    rng = random.Random(seed)
    patch, offset = _face_patch()
    out = []
    for i in range(n):
        img, truth, _ = _compose_faces(rng, patch, offset, 0 if i == n - 1 else 1)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=92)
        out.append((buf.getvalue(), truth, img.size))
    return out


def wait_for_other_jobs_actors_gone(ray_cluster: Any, timeout: float = 120.0) -> None:
    """After a driver of another job was killed: wait until its actors are gone (the GCS's actor
    table), since an annotator may still finish a write while Ray ends it."""
    import ray._private.state as ray_state

    mine = ray_cluster.get_runtime_context().get_job_id()

    def theirs_alive() -> list[str]:
        return [
            a["ActorClassName"]
            for a in ray_state.actors().values()
            if a["State"] != "DEAD" and a["JobID"] != mine and not a["IsDetached"]
        ]

    wait_until(lambda: not theirs_alive(), "the killed run's actors to be gone", timeout, interval=0.5)
