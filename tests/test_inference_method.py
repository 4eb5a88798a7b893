"""The inference method end to end: Ray Data → the real faces app on Ray Serve → the platform.

Critical errors stop the run before anything is written; per-task problems fail only their task.
Outcomes are read back from the platform.
"""

from __future__ import annotations

import logging

import pytest
from helpers import config_for, faces_release, write_media

from totask_ray import ToTask, ToTaskError, run_to_task
from totask_ray.embedded.seeds import write_sample_images
from totask_ray.result import RunStatus

pytestmark = pytest.mark.usefixtures("ray_cluster", "serve_http_port")

FAST = {"serve_poll_interval_s": 0.5, "serve_ready_timeout_s": 120, "progress_bar": False, "num_actors": 1}


@pytest.fixture(scope="module")
def images(platform):
    sample = write_sample_images(platform.media_dir)
    return {name: info["path"] for name, info in sample.items()}


def _project(platform, paths: list[str]) -> tuple[int, list[int]]:
    store = platform.store
    dc = store.create_data_collection("inference", [{"name": "image_1", "is_primary": True}])
    project = store.create_project("inference", dc)
    rows = [
        {"data_unit": store.create_data_unit(dc, {"image_1": {"path": p}}), "status": "pending"}
        for p in paths
    ]
    return project, store.create_tasks_bulk(project, rows)


def _params(project: int, release: int, **extra) -> dict:
    return {"name": "Faces", "project": project, "method": "inference", "pre_processor": release,
            "pre_processor_params": {"confidence_threshold": 0.5}, "batch_size": 8, **extra}  # fmt: skip


@pytest.mark.slow
def test_faces_per_task_outcomes(platform, images, tmp_path):
    garbage = write_media(platform, "inference/garbage.png", b"this is not an image")
    paths = [images["astronaut"], images["coffee"], garbage, "inference/missing.png", images["astronaut"]]
    project, ids = _project(platform, paths)
    release = faces_release(platform)
    result = run_to_task(
        _params(project, release), platform=config_for(platform), report=tmp_path / "r.jsonl", **FAST
    )

    assert result.status is RunStatus.SUCCEEDED
    assert (result.success_count, result.failed_count, result.empty_count) == (3, 2, 1)
    errors = {f.task_id: f.error for f in result.failures}
    # coffee: no face: an empty object list is written and counted apart (the Synapse SDK's rule)
    assert platform.store.get_task(ids[1])["data"] == {"objects": []}
    assert errors[ids[2]] == "the primary file is not an image: it cannot be decoded"
    assert "HTTP 404" in errors[ids[3]] and "signature" not in errors[ids[3]]
    for tid in (ids[0], ids[4]):
        data = platform.store.get_task(tid)["data"]
        (face,) = data["objects"]
        c = face["coordinates"]
        assert face["type"] == "bbox" and face["properties"]["label"] == "face"
        assert 0.5 <= face["properties"]["confidence"] <= 1.0
        assert 177 <= c["x"] + c["width"] / 2 <= 270 and 67 <= c["y"] + c["height"] / 2 <= 160
    for tid in ids[2:4]:
        assert not platform.store.get_task(tid)["data"]
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}


class PerTaskParams(ToTask):
    """Even tasks ask for labels the model never emits: their object list is empty, odd tasks keep theirs."""

    def setup_inference_params(self, primary_file_url, primary_file_name, data_files, *, model_id,
                               pre_processor_params, pre_processor_config, task_data):  # fmt: skip
        params = dict(pre_processor_params)
        assert pre_processor_config["code"] == "faces" and "image_1" in data_files
        if task_data["id"] % 2 == 0:
            params["class_filter"] = ["cat"]
        return params


def test_setup_inference_params_override_reaches_the_app(platform, images):
    project, ids = _project(platform, [images["astronaut"]] * 6)
    result = run_to_task(
        _params(project, faces_release(platform)),
        platform=config_for(platform),
        action_cls=PerTaskParams,
        **FAST,
    )
    even = [t for t in ids if t % 2 == 0]
    assert (result.failed_count, result.success_count, result.empty_count) == (0, len(ids), len(even))
    for tid in ids:
        objects = platform.store.get_task(tid)["data"]["objects"]
        assert bool(objects) is (tid % 2 == 1)


def _free_cpus_once_settled(ray, quiet_s: float = 1.0, limit_s: float = 15.0) -> float:
    """The cluster's free CPUs once they have not changed for `quiet_s` (earlier tests' actors gone)."""
    import time

    last, since, t0 = ray.available_resources().get("CPU", 0.0), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
        now = ray.available_resources().get("CPU", 0.0)
        if now != last:
            last, since = now, time.monotonic()
    return last


@pytest.mark.slow
def test_a_finished_run_gives_its_actors_cpus_back_at_once(platform, images, ray_cluster):
    """A notebook runs jobs one after another: the next one must find the cluster as the last one
    found it. An actor that called a Serve handle used to hold its CPUs for Ray's 5 s kill timeout
    after the run returned (its long poll on the Serve controller kept it from exiting)."""
    import time

    ray = ray_cluster
    project, ids = _project(platform, [images["astronaut"], images["coffee"]] * 4)
    # overwrite: the second run goes through the model too, and finds its results already there
    params = _params(project, faces_release(platform), existing_data="overwrite")
    options = {**FAST, "num_actors": 2}
    run_to_task(params, platform=config_for(platform), **options)
    # settled for longer than Ray's 5 s kill timeout: every actor of the first run is gone
    before = _free_cpus_once_settled(ray, quiet_s=6.0)

    result = run_to_task(params, platform=config_for(platform), **options)
    returned = time.monotonic()
    while ray.available_resources().get("CPU", 0.0) < before and time.monotonic() - returned < 5:
        time.sleep(0.02)
    back_after = time.monotonic() - returned

    # each task is written once, by the first run
    assert (result.failed_count, result.unchanged_count) == (0, len(ids))
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}
    # The hold this guards against is Ray's 5 s kill timeout. A bound of 1.5 s failed once in a CI
    # run of the whole suite, at 2.99 s (cause not found: see the stop-35 note).
    assert back_after < 4.0, f"the annotators' CPUs came back {back_after:.2f} s after the run returned"


@pytest.mark.slow
def test_actor_cpus_reaches_the_replica_plan(platform, images, caplog):
    """The replica plan leaves room for annotators of the size the run asks for: it once planned
    beside half-CPU annotators whatever `actor_cpus` said, so replicas took the room the run's own
    annotators then needed."""
    from ray import serve

    project, ids = _project(platform, [images["astronaut"]] * 2)
    release = faces_release(platform, "1.0.0-cpus")
    try:
        with caplog.at_level(logging.INFO, logger="totask_ray"):
            result = run_to_task(
                _params(project, release), platform=config_for(platform), **{**FAST, "actor_cpus": 1}
            )
        plans = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("pre-processor faces@1.0.0-cpus:")
        ]
        assert len(plans) == 1 and "decode actor" in plans[0], plans
        assert " x 1 CPU fit beside them" in plans[0], f"the plan left room for other annotators: {plans[0]}"
        assert result.success_count == len(ids)
    finally:
        serve.delete("faces@1.0.0-cpus")


def test_release_that_does_not_exist(platform, images):
    project, ids = _project(platform, [images["astronaut"]])
    with pytest.raises(ToTaskError) as info:
        run_to_task(_params(project, 999_999), platform=config_for(platform), **FAST)
    assert str(info.value).startswith("Pre-processor not found")
    assert platform.store.history_counts(task_ids=ids) == {}


def test_capacity_shortfall_is_refused_at_dispatch(platform, images):
    from ray import serve

    project, ids = _project(platform, [images["astronaut"]])
    release = faces_release(
        platform, "9.0.0-gpu", **{"actions.inference.required_resources.required_gpu_count": 4}
    )
    with pytest.raises(ToTaskError) as info:
        run_to_task(_params(project, release), platform=config_for(platform), **FAST)
    message = str(info.value)
    assert message.startswith("Pre-processor not active") and "GPU 4" in message
    assert "faces@9.0.0-gpu" not in serve.status().applications  # refused before dispatch
    assert platform.store.history_counts(task_ids=ids) == {}


@pytest.mark.parametrize(
    ("tag", "filters", "words"),
    [
        ("none", {"status__in": ["done"]}, "No tasks found matching filters"),  # every task is pending
        ("bad", {"no_such_filter": 1}, "task filters"),
    ],
)
def test_nothing_to_do_and_bad_filters_are_refused_before_the_model_starts(
    platform, images, tag, filters, words, caplog
):
    """No matching task, or a filter the platform refuses: the run ends at prepare, and the
    pre-processor was never deployed (not started and torn down)."""
    from ray import serve

    project, ids = _project(platform, [images["astronaut"]])
    version = f"9.0.0-refused-{tag}"
    release = faces_release(platform, version)
    with caplog.at_level(logging.INFO, logger="totask_ray"), pytest.raises(ToTaskError) as info:
        run_to_task(_params(project, release, task_filters=filters), platform=config_for(platform), **FAST)
    assert words in str(info.value)
    assert f"faces@{version}" not in serve.status().applications
    assert not [
        r for r in caplog.records if "dispatching" in r.getMessage() or "tearing down" in r.getMessage()
    ]
    assert platform.store.history_counts(task_ids=ids) == {}


@pytest.mark.slow
def test_an_app_that_fails_to_deploy_fails_fast_and_is_torn_down(platform, images):
    import time

    from ray import serve

    project, ids = _project(platform, [images["astronaut"]])
    release = faces_release(platform, "9.0.0-broken", **{"actions.deployment.options": {"no_such_option": 1}})
    t0 = time.monotonic()
    with pytest.raises(ToTaskError) as info:
        run_to_task(
            _params(project, release), platform=config_for(platform), **{**FAST, "serve_ready_timeout_s": 300}
        )
    assert time.monotonic() - t0 < 120  # fails on DEPLOY_FAILED, well before the timeout
    assert str(info.value) == (
        "Pre-processor not active: Pre-processor deployment failed: serve application reached terminal state (DEPLOY_FAILED)"
    )
    assert "faces@9.0.0-broken" not in serve.status().applications  # rolled back: this run started it
    assert platform.store.history_counts(task_ids=ids) == {}


def _boxes(data: dict | None) -> list[list[float]]:
    objs = (data or {}).get("objects", [])
    return [[o["coordinates"][k] for k in ("x", "y", "width", "height")] for o in objs if o["type"] == "bbox"]


def test_faces_match_ground_truth(platform):
    from totask_ray.embedded.seeds import match_faces, seed_faces_demo

    seeded = seed_faces_demo(platform.store, platform.media_dir, tasks=16, seed=1)
    params = {"name": "Faces_Truth", "project": seeded["project"], "method": "inference",
              "pre_processor": seeded["pre_processor"], "pre_processor_params": seeded["pre_processor_params"],
              "batch_size": 8}  # fmt: skip
    result = run_to_task(params, platform=config_for(platform), **FAST)
    truth = {int(k): v for k, v in seeded["truth"].items()}
    assert any(truth.values()) and not all(truth.values())  # both kinds of image are there
    for tid, faces in truth.items():
        data = platform.store.get_task(tid)["data"]
        found = _boxes(data)
        if not faces:
            assert not found, f"task {tid}: a face-free image got {found}"
            continue
        match = match_faces(faces, found)
        assert not match["missed"], f"task {tid}: truth {faces}, found {found}, IoUs {match['ious']}"
        assert min(match["ious"]) >= 0.5
        for o in data["objects"]:
            assert o["properties"]["label"] == "face" and 0.5 <= o["properties"]["confidence"] <= 1
    assert result.success_count == len(truth)
    assert result.empty_count == sum(1 for f in truth.values() if not f)  # face-free: written, counted apart


@pytest.mark.slow
def test_ocr_reads_the_generated_text_exactly(platform):
    from ray import serve

    from totask_ray.embedded.seeds import seed_ocr_demo

    seeded = seed_ocr_demo(platform.store, platform.media_dir, tasks=8, seed=2)
    params = {"name": "Ocr_Truth", "project": seeded["project"], "method": "inference",
              "pre_processor": seeded["pre_processor"], "pre_processor_params": seeded["pre_processor_params"],
              "batch_size": 4}  # fmt: skip
    try:
        result = run_to_task(params, platform=config_for(platform), **FAST)
    finally:
        for name in [n for n in serve.status().applications if n.startswith("ocr@")]:
            serve.delete(name)
    assert result.failed_count == 0
    for tid, text in seeded["truth"].items():
        objs = platform.store.get_task(int(tid))["data"]["objects"]
        assert "\n".join(o["properties"]["text"] for o in objs) == text
        assert all(o["type"] == "polygon" for o in objs)
