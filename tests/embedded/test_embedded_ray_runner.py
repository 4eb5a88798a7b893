"""The embedded platform with the Ray plugin runner, on the suite's Ray cluster.

A `LocalPlatform` server process attaches to the session cluster as a second driver (its address
travels in TOTASK_PLATFORM_RAY_ADDRESS). Deployments go through `POST plugins/{code}/run/` onto
real Ray Serve; `serve_applications` follows the real status; inference calls go through the
platform to the app's HTTP route and fetch the image from the platform's signed media URLs.

The releases get versions of their own (`1.0.0+runner`, ...) so that no other module's app of the
same name can make a dispatch look already done.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import REPO, free_port

from totask_ray.embedded.ray_runner import ENV_RAY_ADDRESS, ENV_SERVE_PORT
from totask_ray.embedded.seeds import match_faces, release_config, seed_faces_demo, write_sample_images
from totask_ray.embedded.server import LocalPlatform
from totask_ray.embedded.state import media_signature
from totask_ray.platform.synapse.client import SynapseClient, SynapseConfig
from totask_ray.serving.lifecycle import RayServeBackend, route_prefix

pytestmark = pytest.mark.timeout(300)

RUNNER = "totask_ray.embedded.ray_runner:ray_plugin_runner"
VERSION = "1.0.0+runner"
APP = f"faces@{VERSION}"
SDK_APP = f"face-finder@{VERSION}"  # examples/synapse_preprocessor: a release in the Synapse SDK's shape
# The astronaut's face in the 512x512 picture: box centre about (223, 113).
FACE_CENTRE = (223, 113)


@pytest.fixture(scope="module")
def serve_port(ray_cluster) -> int:
    """Serve's proxy on loopback (as tests/serving/conftest.py does); the port actually in use."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    config = _get_global_client().http_config
    assert config.host in ("127.0.0.1", "localhost")
    return int(config.port)


def _sdk_config(version: str) -> dict[str, Any]:
    """The example's own release config; it declares two replicas so that the payload's count
    can be seen to win."""
    cfg = yaml.safe_load((REPO / "examples" / "synapse_preprocessor" / "config.yaml").read_text())
    cfg["version"] = version
    cfg["actions"]["inference"]["serve_options"] = {"num_replicas": 2}
    return cfg


def _faces_config(version: str, **required: Any) -> dict[str, Any]:
    cfg = release_config("faces")
    cfg["version"] = version
    if required:
        cfg["actions"]["inference"]["required_resources"] = required
    return cfg


@pytest.fixture(scope="module")
def rp(ray_cluster, serve_port, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The platform with the Ray runner, its releases and an agent; deletes its apps at the end."""
    address = ray_cluster.get_runtime_context().gcs_address
    lp = LocalPlatform(tmp_path_factory.mktemp("ray-runner-platform"), plugin_runner=RUNNER)
    with pytest.MonkeyPatch.context() as mp:  # the server process inherits the environment
        mp.setenv(ENV_RAY_ADDRESS, address)
        mp.setenv(ENV_SERVE_PORT, str(serve_port))
        lp.start()
    s = lp.store
    broken = _faces_config("1.0.0+broken")
    broken["actions"]["deployment"]["entrypoint"] = "no_such_module_xyz:build_app"
    ctx = {
        "lp": lp,
        "release": s.create_plugin_release("faces", VERSION, _faces_config(VERSION)),
        "gpu4": s.create_plugin_release(
            "faces", "1.0.0+gpu4", _faces_config("1.0.0+gpu4", required_cpu_count=1, required_gpu_count=4)
        ),
        "broken": s.create_plugin_release("faces", "1.0.0+broken", broken),
        "idle": s.create_plugin_release("faces", "1.0.0+idle", _faces_config("1.0.0+idle")),
        "sdk": s.create_plugin_release("face-finder", VERSION, _sdk_config(VERSION)),
        "agent": s.create_agent("ray-runner-agent"),
        "client": httpx.Client(base_url=lp.url, headers=lp.headers, timeout=120),
        "synapse": SynapseClient(SynapseConfig(host=lp.url, access_token=lp.token, retries=0)),
    }
    try:
        yield ctx
    finally:
        ctx["client"].close()
        lp.stop()
        backend = RayServeBackend(delete_timeout_s=30)
        for name in (APP, SDK_APP, "faces@1.0.0+gpu4", "faces@1.0.0+broken", "faces@1.0.0+idle"):
            backend.delete(name)


def _run(rp: dict, body: dict, code: str = "faces") -> httpx.Response:
    return rp["client"].post(f"/plugins/{code}/run/", json={"agent": rp["agent"], "language": "ko", **body})


def _rows(rp: dict, app: str = APP) -> list[dict]:
    rows = rp["synapse"].list_serve_applications(plugin_code=app.partition("@")[0], agent=rp["agent"])
    return [r for r in rows if r["name"] == app]


def _wait_status(rp: dict, wanted: str, timeout_s: float, app: str = APP) -> tuple[list[dict], float]:
    start = time.monotonic()
    while True:
        rows = _rows(rp, app)
        if rows and all(r["status"] == wanted for r in rows):
            return rows, time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"no {wanted} after {timeout_s} s: {rows}"
        time.sleep(0.2)


def _signed(lp: LocalPlatform, rel: str) -> str:
    expires = int(time.time()) + 600
    return f"{lp.url}/media/{rel}?expires={expires}&signature={media_signature(lp.token, rel, expires)}"


def _box(obj: dict) -> list[float]:
    c = obj["coordinates"]
    return [c["x"], c["y"], c["width"], c["height"]]


def _infer(rp: dict, json_body: Any, version: str = VERSION, **params: Any) -> httpx.Response:
    return _run(
        rp,
        {
            "action": "inference",
            "version": version,
            "params": {"model": 1, "method": "post", "json": json_body, **params},
        },
    )


@pytest.fixture(scope="module")
def deployed(rp) -> dict[str, Any]:
    """Dispatch the faces release through the platform and wait until its row says RUNNING."""
    start = time.monotonic()
    r = _run(rp, {"action": "deployment", "version": VERSION, "params": {"num_cpus": 1, "num_gpus": 0}})
    answered = time.monotonic() - start
    assert r.status_code == 200, r.text
    out = r.json()
    rows, _ = _wait_status(rp, "RUNNING", timeout_s=120)
    return {"answer": out, "answered_s": answered, "running_s": time.monotonic() - start, "rows": rows}


def test_deployment_dispatches_onto_ray_and_rows_follow_serve(rp, deployed):
    from ray import serve

    out = deployed["answer"]
    assert out["status"] == "DEPLOYING" and out["dispatched"] is True
    assert out["name"] == APP and out["route_prefix"] == route_prefix("faces", VERSION)
    assert deployed["answered_s"] < 30  # the request does not wait for the replica
    print(f"\ndeploy answered in {deployed['answered_s']:.2f} s, RUNNING after {deployed['running_s']:.2f} s")
    (row,) = deployed["rows"]
    assert row["id"] == out["serve_application"] and row["job"] == out["job_id"]
    assert row["plugin_release"] == rp["release"] and row["version"] == VERSION
    assert row["route_prefix"] == out["route_prefix"]
    # the real thing: Serve runs the app (its route is exercised by the inference tests)
    app = serve.status().applications[APP]
    assert app.status == "RUNNING"
    deadline = time.monotonic() + 10
    while (job := rp["client"].get(f"/jobs/{out['job_id']}/").json())["status"] != "SUCCEEDED":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["result"]["status"] == "RUNNING" and job["result"]["dispatched"] is True
    assert job["result"]["capacity"]["verdict"] == "fits_now"

    # a second dispatch finds it running: no redeploy, same row, its job done at once
    deployed_at = app.last_deployed_time_s
    r = _run(rp, {"action": "deployment", "version": VERSION, "params": {"num_cpus": 1, "num_gpus": 0}})
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["status"] == "RUNNING" and again["dispatched"] is False
    assert again["serve_application"] == row["id"]
    assert rp["client"].get(f"/jobs/{again['job_id']}/").json()["status"] == "SUCCEEDED"
    assert serve.status().applications[APP].last_deployed_time_s == deployed_at
    assert [r["status"] for r in _rows(rp)] == ["RUNNING"]


def test_inference_through_the_platform_finds_the_astronaut(rp, deployed):
    lp = rp["lp"]
    images = write_sample_images(lp.media_dir)
    url = _signed(lp, images["astronaut"]["path"])
    latencies = []
    for _ in range(6):
        start = time.monotonic()
        r = _infer(rp, {"image_path": url, "threshold": 0.5})
        latencies.append(time.monotonic() - start)
        assert r.status_code == 200, r.text
    (face,) = r.json()["objects"]  # task data, as the app answers
    x, y, w, h = _box(face)
    assert face["properties"]["label"] == "face" and face["properties"]["confidence"] >= 0.5
    assert abs(x + w / 2 - FACE_CENTRE[0]) < 15 and abs(y + h / 2 - FACE_CENTRE[1]) < 15
    print(
        f"\ninference through the platform: first {latencies[0] * 1000:.0f} ms, median of the rest "
        f"{statistics.median(latencies[1:]) * 1000:.0f} ms"
    )
    coffee = _infer(rp, {"image_path": _signed(lp, images["coffee"]["path"]), "threshold": 0.5})
    assert coffee.status_code == 200 and coffee.json() == {"objects": []}


def test_faces_demo_scored_through_the_platform(rp, deployed):
    lp = rp["lp"]
    demo = seed_faces_demo(lp.store, lp.media_dir, tasks=8, seed=3)
    for task_id, truth in demo["truth"].items():
        task = rp["client"].get(f"/tasks/{task_id}/", params={"expand": "data_unit"}).json()
        url = task["data_unit"]["files"]["image_1"]["url"]
        r = _infer(rp, {"image_path": url, **demo["pre_processor_params"]})
        assert r.status_code == 200, r.text
        found = match_faces(truth, [_box(o) for o in r.json()["objects"]])
        assert not found["missed"] and not found["extra"], (task_id, truth, r.json())


@pytest.mark.slow
def test_an_sdk_shaped_release_deploys_through_the_platform(rp):
    """examples/synapse_preprocessor: its entrypoint is on actions.inference, a FastAPI-ingress class
    that takes no options (the platform's host is not pushed into its constructor) and fetches
    image_path itself; the dispatch payload's replica count wins over the release's."""
    from ray import serve

    params = {"num_cpus": 1, "num_gpus": 0, "num_replicas": 1}
    r = _run(rp, {"action": "deployment", "version": VERSION, "params": params}, code="face-finder")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["name"] == SDK_APP and out["route_prefix"] == route_prefix("face-finder", VERSION)
    (row,), _ = _wait_status(rp, "RUNNING", timeout_s=120, app=SDK_APP)
    assert row["plugin_release"] == rp["sdk"] and row["id"] == out["serve_application"]
    (deployment,) = serve.status().applications[SDK_APP].deployments.values()
    assert deployment.replica_states == {"RUNNING": 1}

    # It serves, and fetches the platform's media itself. Called through its handle, as the synapse
    # convention calls it: over Serve's HTTP proxy (Ray 2.60, FastAPI 0.165) the example's route
    # reads `body: dict` as a query parameter and answers 422, which is the app's matter.
    lp = rp["lp"]
    images = write_sample_images(lp.media_dir)
    body = {"image_path": _signed(lp, images["astronaut"]["path"])}
    answer = serve.get_app_handle(SDK_APP).infer.remote(body=body).result(timeout_s=60)
    (face,) = answer["objects"]
    x, y, w, h = _box(face)
    assert face["properties"]["label"] == "face"
    assert 177 <= x + w / 2 <= 270 and 67 <= y + h / 2 <= 160
    assert RayServeBackend(delete_timeout_s=30).delete(SDK_APP)


def test_inference_errors_are_clear(rp, deployed):
    lp = rp["lp"]
    r = _infer(rp, {"nothing": 1})
    assert r.status_code == 400 and "rejected the request" in r.json()["detail"]
    assert "image_path" in r.json()["detail"]
    r = _infer(rp, ["not", "an", "object"])
    assert r.status_code == 400 and "params.json" in r.json()["detail"]
    r = _infer(rp, {"image_path": f"{lp.url}/media/demo/images/astronaut.jpg"}, method="get")
    assert r.status_code == 400 and "post" in r.json()["detail"]
    r = _infer(rp, {"image_path": f"{lp.url}/media/nowhere.jpg"})  # the platform refuses the app's GET
    assert r.status_code == 400 and "HTTP 403" in r.json()["detail"]
    r = _infer(rp, {"image_path": "https://example.invalid/x.jpg"}, version="1.0.0+idle")
    assert r.status_code == 409 and "not deployed" in r.json()["detail"], r.text


def test_capacity_never_fits_is_a_400_and_leaves_no_row(rp, ray_cluster):
    r = _run(rp, {"action": "deployment", "version": "1.0.0+gpu4", "params": {"num_cpus": 1, "num_gpus": 4}})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "faces@1.0.0+gpu4 needs GPU 4 x 1 replica; the cluster has GPU 1" in detail
    job = rp["client"].get(f"/jobs/{r.json()['job_id']}/").json()
    assert job["status"] == "FAILED" and job["result"] == {"error": detail}
    # an empty payload means the release's own required_resources (4 GPUs too)
    r = _run(rp, {"action": "deployment", "version": "1.0.0+gpu4"})
    assert r.status_code == 400 and "needs GPU 4" in r.json()["detail"]
    rows = rp["client"].get("/serve_applications/", params={"name": "faces@1.0.0+gpu4"}).json()
    assert rows["count"] == 0
    from ray import serve

    assert "faces@1.0.0+gpu4" not in serve.status().applications
    # params the backend's strict payload model refuses
    r = _run(rp, {"action": "deployment", "version": "1.0.0+gpu4", "params": {"num_gpu": 1}})
    assert r.status_code == 400 and "num_gpu" in r.json()["detail"]


def test_dispatch_failure_is_a_502_with_the_error_type(rp):
    r = _run(
        rp, {"action": "deployment", "version": "1.0.0+broken", "params": {"num_cpus": 1, "num_gpus": 0}}
    )
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert detail.startswith("Pre-processor deployment dispatch failed (ModuleNotFoundError)")
    rows = rp["client"].get("/serve_applications/", params={"name": "faces@1.0.0+broken"}).json()["results"]
    assert [row["status"] for row in rows] == ["DEPLOY_FAILED"]
    assert rp["client"].get(f"/jobs/{r.json()['job_id']}/").json()["status"] == "FAILED"


def test_deleting_the_app_shows_in_serve_applications(rp, deployed):
    # Last in this module: the app goes away behind the platform's back; the monitor notices.
    assert RayServeBackend(delete_timeout_s=30).delete(APP)
    _wait_status(rp, "NOT_STARTED", timeout_s=30)
    r = _infer(rp, {"image_path": _signed(rp["lp"], "demo/images/astronaut.jpg")})
    assert r.status_code == 409 and "not deployed" in r.json()["detail"], r.text


def test_the_runner_factory_reads_the_environment(monkeypatch):
    from totask_ray.embedded.ray_runner import PlatformRayBackend, ray_plugin_runner

    monkeypatch.setenv(ENV_RAY_ADDRESS, "127.0.0.1:1")
    monkeypatch.setenv(ENV_SERVE_PORT, "8123")
    runner = ray_plugin_runner()
    assert isinstance(runner.backend, PlatformRayBackend)
    assert runner.backend.address == "127.0.0.1:1"
    assert runner.backend.http_options == {"host": "127.0.0.1", "port": 8123}
    runner = ray_plugin_runner("10.0.0.1:6379", serve_port=9000, infer_timeout_s=5)
    assert runner.backend.address == "10.0.0.1:6379" and runner.infer_timeout_s == 5
    assert runner.backend.http_options["port"] == 9000


# ------------------------------------------------------------------ the runner's bookkeeping, no Ray


class ScriptedServe:
    """A stand-in for the Ray backend: apps move through `script` one status read at a time."""

    def __init__(self, script: list[str | None]) -> None:
        self.script = list(script)
        self.apps: dict[str, str] = {}
        self.dispatched: list[tuple[str, dict]] = []

    def connect(self) -> None:
        pass

    def http_port(self) -> int | None:
        return None

    def cluster_snapshot(self) -> None:
        return None

    def _advance(self, name: str) -> None:
        if name in self.apps and self.script:
            nxt = self.script.pop(0)
            if nxt is None:
                del self.apps[name]
            else:
                self.apps[name] = nxt

    def status(self, name: str) -> list[dict]:
        self._advance(name)
        return [{"name": name, "status": self.apps[name]}] if name in self.apps else []

    def list_applications(self) -> dict[str, str]:
        return dict(self.apps)

    def dispatch(self, release, payload) -> None:
        time.sleep(0.05)  # long enough for a concurrent deploy to join
        self.dispatched.append((release.app_name, dict(payload)))
        self.apps[release.app_name] = "DEPLOYING"

    def delete(self, name: str) -> bool:
        return self.apps.pop(name, None) is not None


def _scripted_platform(tmp_path: Path, backend: ScriptedServe, scenario) -> None:
    """Run `scenario(client, store, release_id, runner)` against the platform app in-process."""
    import asyncio

    from totask_ray.embedded.app import create_app
    from totask_ray.embedded.ray_runner import RayPluginRunner
    from totask_ray.embedded.store import Store

    store = Store(tmp_path / "platform.db")
    release = store.create_plugin_release("faces", "1.0.0", release_config("faces"))
    runner = RayPluginRunner(backend=backend, poll_interval_s=0.01, monitor_interval_s=0.02)
    app = create_app(store, tmp_path / "media", "t0k", plugin_runner=runner)

    async def main() -> None:
        runner.attach(store)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://platform", headers={"Authorization": "Token t0k"}
        ) as client:
            try:
                await scenario(client, store, release, runner)
            finally:
                await runner.aclose()

    try:
        asyncio.run(main())
    finally:
        store.close()


async def _until(fn, timeout_s: float = 5.0) -> Any:
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not (value := fn()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
    return value


DEPLOY = {"action": "deployment", "params": {"num_cpus": 1, "num_gpus": 0}}


def test_failed_deploy_fails_the_job_and_row(tmp_path):
    backend = ScriptedServe(["DEPLOYING", "DEPLOY_FAILED"])

    async def scenario(client, store, release, runner):
        r = await client.post("/plugins/faces/run/", json=DEPLOY)
        assert r.status_code == 200 and r.json()["status"] == "DEPLOYING", r.text
        job_id, row_id = r.json()["job_id"], r.json()["serve_application"]
        job = await _until(lambda: (j := store.get_job(job_id))["status"] == "FAILED" and j)
        assert "terminal state (DEPLOY_FAILED)" in job["result"]["error"]
        assert store.get_serve_application(row_id)["status"] == "DEPLOY_FAILED"

    _scripted_platform(tmp_path, backend, scenario)
    assert backend.dispatched == [("faces@1.0.0", {"num_cpus": 1, "num_gpus": 0})]


def test_rows_follow_the_cluster_after_running_and_are_reused(tmp_path):
    backend = ScriptedServe(["RUNNING"])

    async def scenario(client, store, release, runner):
        first, second = await __import__("asyncio").gather(
            client.post("/plugins/faces/run/", json=DEPLOY),
            client.post("/plugins/faces/run/", json=DEPLOY),
        )
        assert first.status_code == second.status_code == 200
        row_id = first.json()["serve_application"]
        assert second.json()["serve_application"] == row_id and second.json()["joined"] is True
        for r in (first, second):
            await _until(lambda r=r: store.get_job(r.json()["job_id"])["status"] == "SUCCEEDED")
        assert len(backend.dispatched) == 1  # the second call joined the first run
        assert store.get_serve_application(row_id)["status"] == "RUNNING"
        backend.apps["faces@1.0.0"] = "UNHEALTHY"  # later, behind the platform's back
        await _until(lambda: store.get_serve_application(row_id)["status"] == "UNHEALTHY")
        del backend.apps["faces@1.0.0"]
        await _until(lambda: store.get_serve_application(row_id)["status"] == "NOT_STARTED")
        backend.script = ["DEPLOYING", "RUNNING"]
        r = await client.post("/plugins/faces/run/", json=DEPLOY)
        assert r.json()["serve_application"] == row_id  # one row per app and agent
        await _until(lambda: store.get_serve_application(row_id)["status"] == "RUNNING")
        assert store.list_serve_applications(name="faces@1.0.0")[0] == 1

    _scripted_platform(tmp_path, backend, scenario)
    assert len(backend.dispatched) == 2


def test_inference_without_serve_is_a_503(tmp_path):
    async def scenario(client, store, release, runner):
        body = {"action": "inference", "params": {"method": "post", "json": {"image_path": "http://x/y"}}}
        r = await client.post("/plugins/faces/run/", json=body)
        assert r.status_code == 503 and "Serve is not running" in r.json()["detail"]

    _scripted_platform(tmp_path, ScriptedServe([]), scenario)


def test_release_payload_for_an_sdk_shaped_release():
    """The payload's resources land on actions.inference and its replica count replaces the one in
    the deployed action's serve_options; the platform's host is allow-listed only where options
    reach totask-ray's image fetch (a builder's args), never in an SDK class's constructor."""
    from totask_ray.embedded.ray_runner import PLATFORM_HOST, _release_with_payload

    sdk = {"id": 3, "plugin": "face-finder", "version": "1.0.0", "config": _sdk_config("1.0.0")}
    rel = _release_with_payload(sdk, {"num_cpus": 2, "num_gpus": 0, "num_replicas": 3})
    target = rel.config.deploy_target
    assert target is not None and target.source == "inference"
    assert target.options == {} and target.serve_options.num_replicas is None
    assert rel.config.actions.inference.required_resources.num_replicas == 3
    assert _release_with_payload(sdk, {}).config.deploy_target.serve_options.num_replicas == 2

    builder = _faces_config("1.0.0")
    builder["actions"]["inference"]["entrypoint"] = builder["actions"].pop("deployment")["entrypoint"]
    rel = _release_with_payload({"plugin": "faces", "version": "1.0.0", "config": builder}, {})
    assert rel.config.deploy_target.options["allowed_hosts"] == [PLATFORM_HOST]
