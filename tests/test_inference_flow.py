"""The inference data plane (issue 25): what a batch carries to the replica, and how a run rides
through a lost replica and a full queue. Real Ray Serve, the embedded platform over HTTP, small sizes.

The app here is the shared deployment around a small model, with one addition: its replica tells a
named recorder actor what each call brought (the payload's type and bytes) and when the model starts
on a batch, so a test can assert on the replica's side and kill a replica while a batch is in it.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from helpers import config_for, png, wait_until, write_media
from ray import serve

from totask_ray import ToTask, run_to_task
from totask_ray.result import RunStatus
from totask_ray.serving.deployment import PreProcessorDeployment
from totask_ray.serving.interface import Detection, PreProcessorSpec
from totask_ray.serving.params import InferenceParams
from totask_ray.serving.resources import DeploymentArgs

# The replicas cannot import this test module: its classes travel with the app by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster", "serve_http_port")]

RECORDER = "inference-flow-recorder"
FAST = {"serve_poll_interval_s": 0.2, "serve_ready_timeout_s": 120, "progress_bar": False}
SPEC = PreProcessorSpec(name="probe", labels={0: "thing"}, devices=("cpu",))


@ray.remote(num_cpus=0)
class Recorder:
    """What the replicas saw: one row per image a call brought, and the batches the model started."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, int]] = []
        self.started: list[str] = []  # the replica's actor name, per batch the model started

    def payload(self, rows: list[tuple[str, int]]) -> None:
        self.payloads.extend(rows)

    def start(self, replica: str) -> None:
        self.started.append(replica)

    def read(self) -> tuple[list[tuple[str, int]], list[str]]:
        return self.payloads, self.started


class SlowBox:
    """One box in the middle of each image, after `delay_s`: a model slow enough to be caught in."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    @property
    def spec(self) -> PreProcessorSpec:
        return SPEC

    def detect(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]:
        ray.get_actor(RECORDER).start.remote(ray.get_runtime_context().get_actor_name() or "")
        time.sleep(self.delay_s)
        out = []
        for img in images:
            assert isinstance(img, np.ndarray) and img.ndim == 3  # the model still gets pixels
            h, w = img.shape[:2]
            out.append([Detection(label="thing", class_id=0, score=0.9, bbox=(w / 4, h / 4, w / 2, h / 2))])
        return out


class RecordingDeployment(PreProcessorDeployment):
    """The shared deployment, telling the recorder what each call brought before it is decoded."""

    async def model_inputs(self, images: Any) -> Any:
        rows = [(type(img).__name__, int(getattr(img, "nbytes", 0))) for img in images]
        ray.get_actor(RECORDER).payload.remote(rows)
        return await super().model_inputs(images)


def build_probe(args: dict[str, Any]) -> serve.Application:
    parsed = DeploymentArgs.model_validate(dict(args))
    return (
        serve.deployment(RecordingDeployment)
        .options(name="Probe", **parsed.deployment_options())
        .bind(SlowBox, max_batch_size=parsed.max_batch_size, options=parsed.options)
    )


def probe_release(platform: Any, version: str, *, delay_s: float = 0.0, **serve_options: Any) -> int:
    config = {
        "code": "probe",
        "name": "probe",
        "version": version,
        "actions": {
            "inference": {"required_resources": {"required_cpu_count": 1, "required_gpu_count": 0}},
            "deployment": {
                "entrypoint": f"{__name__}:build_probe",
                "options": {"delay_s": delay_s},
                "serve_options": {"num_replicas": 1, **serve_options},
            },
        },
    }
    return platform.store.create_plugin_release("probe", version, config)


@pytest.fixture
def recorder():
    handle = Recorder.options(name=RECORDER).remote()
    ray.get(handle.read.remote())
    yield handle
    ray.kill(handle)


@pytest.fixture
def delete_app():
    names: list[str] = []
    yield names
    for name in names:
        serve.delete(name)


def _project(platform: Any, name: str, bodies: list[bytes]) -> tuple[int, list[int]]:
    store = platform.store
    dc = store.create_data_collection(name, [{"name": "image_1", "is_primary": True}])
    project = store.create_project(name, dc)
    paths = [write_media(platform, f"{name}/{i}.jpg", body) for i, body in enumerate(bodies)]
    rows = [{"data_unit": store.create_data_unit(dc, {"image_1": {"path": p}})} for p in paths]
    return project, store.create_tasks_bulk(project, rows)


def _jpeg(seed: int, size: int = 256) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _params(project: int, release: int, **extra: Any) -> dict[str, Any]:
    return {"name": "Flow", "project": project, "method": "inference", "pre_processor": release,
            "batch_size": 4, **extra}  # fmt: skip


def _all_written(platform: Any, ids: list[int]) -> None:
    for tid in ids:
        (obj,) = platform.store.get_task(tid)["data"]["objects"]
        assert obj["properties"]["label"] == "thing", (tid, obj)


def test_a_batch_reaches_the_replica_as_the_files_bytes(platform, recorder, delete_app):
    bodies = [_jpeg(i) for i in range(6)] + [png(np.full((40, 60, 3), 200, np.uint8))]
    project, ids = _project(platform, "flow-bytes", bodies)
    release = probe_release(platform, "1.0.0")
    delete_app.append("probe@1.0.0")
    result = run_to_task(_params(project, release), platform=config_for(platform), num_actors=1, **FAST)

    assert (result.status, result.success_count, result.failed_count) == (RunStatus.SUCCEEDED, 7, 0)
    _all_written(platform, ids)
    payloads, _ = ray.get(recorder.read.remote())
    assert sorted(payloads) == sorted(("EncodedImage", len(b)) for b in bodies)
    # what crossed: the files' bytes (256x256 JPEGs of ~10 kB where their arrays are 196 kB)
    arrays = sum(256 * 256 * 3 for _ in range(6)) + 40 * 60 * 3
    assert sum(n for _, n in payloads) <= 1.2 * sum(map(len, bodies)) < arrays / 5


def test_an_image_that_only_the_replica_finds_broken_fails_alone(platform, recorder, delete_app):
    good = _jpeg(1)
    truncated = good[: len(good) // 2]  # a sound header: the annotator's check passes it
    project, ids = _project(platform, "flow-truncated", [good, truncated, good])
    release = probe_release(platform, "1.0.1")
    delete_app.append("probe@1.0.1")
    result = run_to_task(_params(project, release), platform=config_for(platform), num_actors=1, **FAST)

    assert (result.success_count, result.failed_count) == (2, 1)
    (failure,) = result.failures
    assert failure.task_id == ids[1] and failure.error.startswith("the primary file cannot be decoded")
    _all_written(platform, [ids[0], ids[2]])
    assert not platform.store.get_task(ids[1])["data"]


def test_a_replica_killed_mid_batch_costs_retries_not_tasks(platform, recorder, delete_app):
    project, ids = _project(platform, "flow-kill", [_jpeg(i, 64) for i in range(12)])
    release = probe_release(platform, "1.0.2", delay_s=1.5)
    delete_app.append("probe@1.0.2")
    out: dict[str, Any] = {}

    def run() -> None:
        out["result"] = run_to_task(
            _params(project, release), platform=config_for(platform), num_actors=1, **FAST
        )

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    started = wait_until(
        lambda: ray.get(recorder.read.remote())[1], timeout=120, what="the model to start on a first batch"
    )
    ray.kill(ray.get_actor(started[0], namespace="serve"), no_restart=True)  # the replica, mid-batch
    runner.join(timeout=300)
    assert not runner.is_alive(), "the run did not end within 300 s of the replica's loss"

    result = out["result"]
    assert (result.status, result.success_count, result.failed_count) == (RunStatus.SUCCEEDED, 12, 0)
    assert result.call_retries > 0
    _all_written(platform, ids)
    assert len(set(ray.get(recorder.read.remote())[1])) == 2  # Serve replaced the replica


class OwnParams(ToTask):
    """Each task its own params: one call per task, all of a batch at once (more calls than the queue)."""

    def setup_inference_params(self, primary_file_url, primary_file_name, data_files, *, model_id,
                               pre_processor_params, pre_processor_config, task_data):  # fmt: skip
        return {**pre_processor_params, "max_objects": 10 + task_data["id"]}


def test_an_overloaded_replica_set_backs_off_and_fails_nothing(platform, recorder, delete_app, tmp_path):
    project, ids = _project(platform, "flow-overload", [_jpeg(i, 64) for i in range(16)])
    release = probe_release(platform, "1.0.3", delay_s=0.05, max_queued_requests=1, max_ongoing_requests=1)
    delete_app.append("probe@1.0.3")
    report = tmp_path / "report.jsonl"
    result = run_to_task(
        _params(project, release, batch_size=8),
        platform=config_for(platform),
        action_cls=OwnParams,
        num_actors=1,
        report=report,
        **FAST,
    )
    assert (result.status, result.success_count, result.failed_count) == (RunStatus.SUCCEEDED, 16, 0)
    assert result.call_backoffs > 0
    _all_written(platform, ids)
    # the report carries the same count, on the tasks whose call was sent again
    import json

    rows = [json.loads(line) for line in Path(report).read_text().splitlines()]
    assert sum(r.get("backoffs", 0) for r in rows) == result.call_backoffs
