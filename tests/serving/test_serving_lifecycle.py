"""Detect / dispatch / wait: fail-fast matrix on a scripted backend, then the real thing on Ray Serve."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import pytest
import ray
import ray.cloudpickle
from fastapi import FastAPI
from ray import serve

from totask_ray.serving.capacity import CapacityError, ClusterSnapshot, Verdict
from totask_ray.serving.config import PreProcessorRelease, parse_release_config
from totask_ray.serving.lifecycle import (
    LifecycleResult,
    RayServeBackend,
    ServeApplicationError,
    ServeBackend,
    SynapseServeBackend,
    classify_serve_status,
    ensure_running,
    teardown,
)
from totask_ray.serving.resources import DeploymentArgs

# The test apps below are defined in this module: ship them to replicas by value, since Ray workers
# cannot import a pytest-collected module by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def release(code: str = "demo", entrypoint: str | None = None, **rr: Any) -> PreProcessorRelease:
    rr = rr or {"required_cpu_count": 0.25, "required_gpu_count": 0}
    cfg = parse_release_config(
        {
            "code": code,
            "name": code,
            "version": "0.1.0",
            "actions": {
                "inference": {"required_resources": rr},
                "deployment": {"entrypoint": entrypoint or f"{__name__}:build_ok"},
            },
        }
    )
    return PreProcessorRelease.from_config(cfg)


# ------------------------------------------------------------------ classification (pure)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ([{"status": "RUNNING"}], ("running", None)),
        ([{"status": "DEPLOY_FAILED"}, {"status": "RUNNING"}], ("running", None)),  # RUNNING wins
        ([{"status": "UNHEALTHY"}, {"status": "running"}], ("running", None)),
        ({"count": 2, "results": [{"status": "UNAVAILABLE"}, {"status": "RUNNING"}]}, ("running", None)),
        ([{"status": "DEPLOY_FAILED"}], ("failed", "DEPLOY_FAILED")),
        ([{"status": "UNHEALTHY"}], ("failed", "UNHEALTHY")),
        ([{"status": "UNAVAILABLE"}, {"status": "DEPLOYING"}], ("failed", "UNAVAILABLE")),
        ([{"status": "NOT_STARTED"}], ("pending", "NOT_STARTED")),
        ([{"status": "DEPLOYING"}], ("pending", "DEPLOYING")),
        ([{"status": "DELETING"}], ("pending", "DELETING")),
        ([], ("pending", None)),
        (None, ("pending", None)),
        ({"detail": "oops"}, ("pending", None)),
        (["garbage", 3, {"status": None}], ("pending", "GARBAGE")),
        ("RUNNING", ("running", None)),
    ],
)
def test_classify(payload, expected):
    assert classify_serve_status(payload) == expected


# ------------------------------------------------------------------ scripted backend


class ScriptedBackend:
    """Answers status polls from a script; records dispatches and deletes."""

    def __init__(self, statuses: list[Any], *, dispatch_error: Exception | None = None, snapshot=None):
        self.statuses = list(statuses)
        self.dispatch_error = dispatch_error
        self.snapshot = snapshot
        self.dispatched: list[dict] = []
        self.deleted: list[str] = []

    def status(self, app_name: str) -> Any:
        value = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(value, Exception):
            raise value
        return value

    def dispatch(self, release, payload) -> None:
        if self.dispatch_error:
            raise self.dispatch_error
        self.dispatched.append(dict(payload))

    def delete(self, app_name: str) -> bool:
        self.deleted.append(app_name)
        return True

    def cluster_snapshot(self):
        return self.snapshot


def test_backends_satisfy_the_protocol():
    assert isinstance(ScriptedBackend([[]]), ServeBackend)
    assert isinstance(RayServeBackend(), ServeBackend)
    assert isinstance(SynapseServeBackend(object(), 1), ServeBackend)


def test_already_running_is_not_redeployed_nor_torn_down():
    backend = ScriptedBackend([[{"status": "RUNNING"}]])
    result = ensure_running(release(), backend, poll_interval_s=0.01)
    assert (result.started, result.status, backend.dispatched) == (False, "RUNNING", [])
    assert teardown(result, backend) is False and backend.deleted == []


def test_dispatch_then_wait_to_running_and_teardown():
    backend = ScriptedBackend(
        [[], [{"status": "NOT_STARTED"}], [{"status": "DEPLOYING"}], [{"status": "RUNNING"}]]
    )
    result = ensure_running(release(), backend, poll_interval_s=0.01, timeout_s=5)
    assert result.started and result.status == "RUNNING" and result.app_name == "demo@0.1.0"
    assert backend.dispatched == [{"num_cpus": 0.25, "num_gpus": 0}]
    assert teardown(result, backend) is True and backend.deleted == ["demo@0.1.0"]


def test_failed_or_unreadable_status_at_detection_dispatches():
    backend = ScriptedBackend([[{"status": "DEPLOY_FAILED"}], [{"status": "RUNNING"}]])
    assert ensure_running(release(), backend, poll_interval_s=0.01).started
    backend = ScriptedBackend([ConnectionError("down"), [{"status": "RUNNING"}]])
    assert ensure_running(release(), backend, poll_interval_s=0.01).started


class ClientError(Exception):
    def __init__(self) -> None:
        super().__init__("403 https://api.example.com/plugins/demo/run/ token=SECRET")


def test_dispatch_error_message_has_only_the_type():
    backend = ScriptedBackend([[]], dispatch_error=ClientError())
    with pytest.raises(RuntimeError) as info:
        ensure_running(release(), backend, poll_interval_s=0.01)
    assert str(info.value) == "Pre-processor deployment dispatch failed (ClientError)"
    assert isinstance(info.value.__cause__, ClientError)
    assert "SECRET" not in str(info.value) and "https" not in str(info.value)


@pytest.mark.parametrize("terminal", ["DEPLOY_FAILED", "UNHEALTHY", "UNAVAILABLE"])
def test_terminal_states_fail_at_once(terminal):
    backend = ScriptedBackend(
        [[], [{"status": "DEPLOYING"}], [{"status": terminal, "message": "Traceback..."}]]
    )
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        ensure_running(release(), backend, poll_interval_s=0.01, timeout_s=60)
    assert time.monotonic() - start < 2
    assert str(info.value) == (
        f"Pre-processor deployment failed: serve application reached terminal state ({terminal})"
    )
    assert isinstance(info.value.__cause__, ServeApplicationError)
    assert "Traceback" in str(info.value.__cause__) and "Traceback" not in str(info.value)


def test_running_wins_over_failed_replicas_while_waiting():
    backend = ScriptedBackend([[], [{"status": "DEPLOY_FAILED"}, {"status": "RUNNING"}]])
    assert ensure_running(release(), backend, poll_interval_s=0.01).status == "RUNNING"


def test_pending_and_malformed_keep_polling_until_timeout():
    backend = ScriptedBackend([[], {"weird": True}, ValueError("flaky"), [{"status": "DELETING"}], []])
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        ensure_running(release(), backend, poll_interval_s=0.05, timeout_s=0.4)
    assert 0.35 < time.monotonic() - start < 2
    assert str(info.value) == "Pre-processor did not become ready within timeout"


def test_capacity_gate_refuses_before_dispatch_and_reports_otherwise():
    snap = ClusterSnapshot(totals=[{"CPU": 4.0}], available=[{"CPU": 4.0}])
    backend = ScriptedBackend([[]], snapshot=snap)
    with pytest.raises(
        CapacityError, match=re.escape("demo@0.1.0 needs GPU 1 x 1 replica; the cluster has GPU 0")
    ):
        ensure_running(release(required_gpu_count=1), backend, poll_interval_s=0.01)
    assert backend.dispatched == []
    # the 0.1 GPU default is a GPU request too: a CPU-only cluster can never hold it
    with pytest.raises(CapacityError, match=re.escape("a CPU-only app must declare required_gpu_count: 0")):
        ensure_running(release(required_cpu_count=1), backend, poll_interval_s=0.01)
    backend = ScriptedBackend([[], [{"status": "RUNNING"}]], snapshot=snap)
    result = ensure_running(release(), backend, poll_interval_s=0.01)
    assert result.capacity is not None and result.capacity.verdict is Verdict.FITS_NOW
    # opting out of the gate dispatches anyway
    backend = ScriptedBackend([[], [{"status": "RUNNING"}]], snapshot=snap)
    assert ensure_running(
        release(required_gpu_count=1), backend, check_capacity=False, poll_interval_s=0.01
    ).started


class FakeSynapseClient:
    def __init__(self, pages: list[list[dict]]) -> None:
        self.pages = pages
        self.calls: list[tuple] = []

    def list_serve_applications(self, *, plugin_code: str, agent: int) -> Any:
        self.calls.append(("list", plugin_code, agent))
        return self.pages.pop(0) if len(self.pages) > 1 else self.pages[0]

    def run_plugin(self, code: str, body: dict) -> dict:
        self.calls.append(("run", code, body))
        return {"job_id": 1}


def test_synapse_backend_speaks_the_reference_shapes():
    client = FakeSynapseClient([[], [{"status": "DEPLOYING"}], [{"status": "RUNNING"}]])
    backend = SynapseServeBackend(client, agent=3)
    rel = release(required_cpu_count=2, required_gpu_count=1, num_replicas=2, memory=4294967296)
    result = ensure_running(rel, backend, poll_interval_s=0.01)
    assert result.started
    assert client.calls[0] == ("list", "demo", 3)
    assert client.calls[1] == (
        "run",
        "demo",
        {
            "agent": 3,
            "action": "deployment",
            "params": {"num_cpus": 2, "num_gpus": 1, "num_replicas": 2, "memory": 4294967296},
            "version": "0.1.0",
        },
    )
    assert teardown(result, backend) is False  # the contract has no delete endpoint


def test_synapse_backend_ignores_rows_of_other_versions():
    page = {
        "count": 4,
        "results": [
            {"name": "demo@0.0.9", "version": "0.0.9", "status": "RUNNING"},
            {"name": "other-name", "version": "0.0.9", "status": "RUNNING"},
            {"name": "demo@0.1.0", "version": "0.1.0", "status": "DEPLOYING"},
            {"status": "NOT_STARTED"},
        ],
    }
    backend = SynapseServeBackend(FakeSynapseClient([page]), agent=3)
    rows = backend.status("demo@0.1.0")
    assert [r["status"] for r in rows] == ["DEPLOYING", "NOT_STARTED"]
    assert classify_serve_status(rows) == ("pending", "DEPLOYING")


# ------------------------------------------------------------------ real Ray Serve


@serve.deployment
class Echo:
    async def predict(self, images: list, params: dict) -> list:
        return [[] for _ in images]


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("constructor fails on purpose")


def build_ok(args: dict) -> serve.Application:
    return Echo.options(**DeploymentArgs.model_validate(args).deployment_options()).bind()


def build_broken(args: dict) -> serve.Application:
    return Broken.options(**DeploymentArgs.model_validate(args).deployment_options()).bind()


@pytest.fixture
def backend(ray_cluster):
    b = RayServeBackend(delete_timeout_s=30)
    created: list[str] = []
    b.created = created  # type: ignore[attr-defined]
    yield b
    for name in created:
        b.delete(name)


@pytest.mark.slow
def test_ray_dispatch_to_running_then_detect_without_redeploy(backend):
    rel = release("echo")
    backend.created.append(rel.app_name)
    first = ensure_running(rel, backend, poll_interval_s=0.1, timeout_s=60)
    assert isinstance(first, LifecycleResult) and first.started and first.status == "RUNNING"
    assert first.capacity is not None and first.capacity.verdict is Verdict.FITS_NOW
    handle = serve.get_app_handle(rel.app_name)
    assert handle.predict.remote([1, 2], {}).result(timeout_s=30) == [[], []]

    deployed_at = serve.status().applications[rel.app_name].last_deployed_time_s
    second = ensure_running(rel, backend, poll_interval_s=0.1, timeout_s=60)
    assert not second.started and second.elapsed_s < 2
    assert serve.status().applications[rel.app_name].last_deployed_time_s == deployed_at  # no redeploy
    assert teardown(second, backend) is False
    assert backend.status(rel.app_name)[0]["status"] == "RUNNING"  # left alone
    assert teardown(first, backend) is True
    assert backend.status(rel.app_name) == []


@pytest.mark.slow
def test_ray_constructor_failure_fails_fast(backend):
    rel = release("broken", entrypoint=f"{__name__}:build_broken")
    backend.created.append(rel.app_name)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        ensure_running(rel, backend, poll_interval_s=0.2, timeout_s=120)
    assert time.monotonic() - start < 40  # measured ~7 s on Ray 2.60; far under the timeout
    assert (
        str(info.value)
        == "Pre-processor deployment failed: serve application reached terminal state (DEPLOY_FAILED)"
    )
    assert "constructor fails on purpose" in str(info.value.__cause__)


@pytest.mark.slow
def test_ray_timeout_when_replica_waits_for_a_busy_gpu(backend, ray_cluster):
    # The session cluster has one logical GPU: hold it, so a GPU replica fits the totals but not
    # what is free (verdict busy -> dispatch goes ahead) and can never start before the timeout.
    holder = ray_cluster.remote(num_gpus=1, num_cpus=0)(type("Holder", (), {"ping": lambda self: 1})).remote()
    try:
        ray_cluster.get(holder.ping.remote(), timeout=30)
        rel = release("gpu-wait", required_cpu_count=0.25, required_gpu_count=1)
        backend.created.append(rel.app_name)
        deadline = time.monotonic() + 10
        while backend.cluster_snapshot().available[0].get("GPU", 0) >= 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            ensure_running(rel, backend, poll_interval_s=0.2, timeout_s=2.0)
        assert 1.9 < time.monotonic() - start < 15
        assert str(info.value) == "Pre-processor did not become ready within timeout"
        assert backend.status(rel.app_name)[0]["status"] == "DEPLOYING"
    finally:
        ray_cluster.kill(holder)


def test_ray_never_fits_raises_before_dispatch(backend):
    rel = release("too-big", required_cpu_count=1, required_gpu_count=2)
    with pytest.raises(
        CapacityError, match=r"too-big@0\.1\.0 needs GPU 2 x 1 replica; the cluster has GPU 1"
    ):
        ensure_running(rel, backend, poll_interval_s=0.1, timeout_s=5)
    assert backend.status(rel.app_name) == []


def test_ray_dispatch_error_for_a_bad_entrypoint(backend):
    rel = release("noimport", entrypoint="no_such_module_xyz:build_app")
    with pytest.raises(
        RuntimeError, match=r"^Pre-processor deployment dispatch failed \(ModuleNotFoundError\)$"
    ):
        ensure_running(rel, backend, poll_interval_s=0.1, timeout_s=5)


sdk_api = FastAPI()


class SdkStyleDeployment:
    """Shaped like the SDK's ``BaseServeDeployment``: a plain class named by ``actions.inference``,
    with a FastAPI ``app`` whose ``POST /`` is the route the synapse convention calls."""

    app = sdk_api

    def __init__(self, backend_url: str, greeting: str = "hello") -> None:
        self.backend_url = backend_url
        self.greeting = greeting

    @sdk_api.post("/")
    async def root(self, body: dict) -> dict:
        return {"echo": body}

    async def infer_batch(self, requests: list) -> list:
        return [{"n": r, "batch": len(requests)} for r in requests]

    async def whoami(self) -> dict:
        return {"backend_url": self.backend_url, "greeting": self.greeting}


@pytest.mark.slow
def test_ray_deploys_an_sdk_release_with_the_entrypoint_on_inference(backend, monkeypatch):
    monkeypatch.setenv("SYNAPSE_PLUGIN_RUN_HOST", "https://backend.example")
    cfg = parse_release_config(
        {
            "code": "sdk-style",
            "name": "SDK style",
            "version": "0.1.0",
            "category": "pre_annotation",
            "actions": {
                "inference": {
                    "entrypoint": f"{__name__}:SdkStyleDeployment",
                    "method": "serve",
                    "required_resources": {"required_cpu_count": 0.25, "required_gpu_count": 0},
                    "serve_options": {
                        "max_ongoing_requests": 8,
                        "batch": {"max_batch_size": 4, "batch_wait_timeout_s": 0.2},
                    },
                }
            },
        }
    )
    rel = PreProcessorRelease.from_config(cfg)
    assert rel.convention == "synapse"
    backend.created.append(rel.app_name)
    result = ensure_running(rel, backend, poll_interval_s=0.1, timeout_s=60)
    assert result.started and result.status == "RUNNING"
    app = serve.status().applications[rel.app_name]
    assert list(app.deployments) == ["SdkStyleDeployment"]
    handle = serve.get_app_handle(rel.app_name)
    assert handle.whoami.remote().result(timeout_s=30) == {
        "backend_url": "https://backend.example",
        "greeting": "hello",
    }
    assert handle.root.remote({"image_path": "x"}).result(timeout_s=30) == {"echo": {"image_path": "x"}}
    # @serve.batch was applied, as the release declares serve_options.batch: concurrent calls merge
    responses = [handle.infer_batch.remote(i) for i in range(4)]
    out = [r.result(timeout_s=30) for r in responses]
    assert [o["n"] for o in out] == [0, 1, 2, 3] and max(o["batch"] for o in out) > 1
    assert teardown(result, backend) is True
