"""Pre-processors and plugins as Synapse users have them, run unchanged.

- A pre-processor written the Synapse way (`examples/synapse_preprocessor`: a FastAPI-ingress Serve
  deployment with `@serve.batch` that reads `serve.get_multiplexed_model_id()`, none of
  totask-ray's serving code), published with a release config in the SDK's shape.
- The seeds' plugin template with only its import changed, for both methods.
- An SDK-style plugin: `setup_inference_params` returns the SDK's request, hooks use `self.context`.
- Refusals before anything is deployed or written: a bad parameter value, an unmapped label, a
  device the app cannot use, a missing model.
Every outcome is read back from the platform.
"""

from __future__ import annotations

import sys

import pytest
import yaml
from helpers import REPO, config_for, good_unit, make_project

from totask_ray import ToTaskError, run_to_task
from totask_ray.embedded.seeds import write_sample_images
from totask_ray.serving.config import load_release_config

pytestmark = pytest.mark.usefixtures("ray_cluster", "serve_http_port")

FAST = {"serve_poll_interval_s": 0.5, "serve_ready_timeout_s": 120, "progress_bar": False, "num_actors": 1}
APP = "face-finder@1.0.0"


def _plugin(name: str) -> type:
    sys.path.insert(0, str(REPO / "tests" / "plugins"))
    try:
        module = __import__(name)
    finally:
        sys.path.pop(0)
    return module.ToTask


@pytest.fixture(scope="module")
def images(platform):
    sample = write_sample_images(platform.media_dir)
    return {name: info["path"] for name, info in sample.items()}


@pytest.fixture(scope="module")
def synapse_release(platform):
    config = yaml.safe_load((REPO / "examples" / "synapse_preprocessor" / "config.yaml").read_text())
    # one replica: the test reads the app's batch sizes through a handle, which reaches one replica;
    # left unset, a run sizes the count from the free CPUs and a lone run got 3 (the sizes then
    # summed to one replica's share of the tasks)
    config["actions"]["inference"]["required_resources"]["num_replicas"] = 1
    yield platform.store.create_plugin_release(config["code"], config["version"], config)
    from ray import serve

    if APP in serve.status().applications:
        serve.delete(APP)


def _faces_release(platform, version: str = "1.0.0") -> int:
    cfg = load_release_config(REPO / "serve_apps" / "faces").model_dump(mode="json", exclude_none=True)
    cfg["version"] = version
    return platform.store.create_plugin_release("faces", version, cfg)


def _project(platform, paths: list[str], classes: list[str] | None = None) -> tuple[int, list[int]]:
    store = platform.store
    dc = store.create_data_collection("synapse-style", [{"name": "image_1", "is_primary": True}])
    project = store.create_project("synapse-style", dc, classes)
    rows = [
        {"data_unit": store.create_data_unit(dc, {"image_1": {"path": p}}), "status": "pending"}
        for p in paths
    ]
    return project, store.create_tasks_bulk(project, rows)


def _job(project: int, release: int, **extra) -> dict:
    return {"name": "Synapse_Style", "project": project, "method": "inference", "pre_processor": release,
            "batch_size": 8, **extra}  # fmt: skip


@pytest.mark.slow
def test_the_sdk_template_runs_a_synapse_style_preprocessor_end_to_end(platform, images, synapse_release):
    from ray import serve

    paths = [images["astronaut"], images["coffee"], *[images["astronaut"]] * 6]
    project, ids = _project(platform, paths, classes=["face"])
    result = run_to_task(
        _job(project, synapse_release, model=11), platform=config_for(platform),
        action_cls=_plugin("sdk_template"), **FAST,
    )  # fmt: skip
    # the coffee cup has no face: an empty object list, written and counted apart, not a failure
    assert (result.success_count, result.failed_count, result.empty_count) == (8, 0, 1)
    assert platform.store.get_task(ids[1])["data"] == {"objects": []}
    for tid in ids[:1] + ids[2:]:
        (face,) = platform.store.get_task(tid)["data"]["objects"]
        assert face["properties"]["label"] == "face" and face["class_id"] == 1  # the project's class id
        assert face["properties"]["model"] == "11"  # the multiplexed model id, made from `model`
        c = face["coordinates"]
        assert 177 <= c["x"] + c["width"] / 2 <= 270 and 67 <= c["y"] + c["height"] / 2 <= 160
    # one request per task, many in flight: the app's own @serve.batch merged them
    sizes = serve.get_app_handle(APP).batches.remote().result(timeout_s=30)["sizes"]
    assert sum(sizes) == len(ids) and max(sizes) > 1


@pytest.mark.slow
def test_an_sdk_style_plugin_sends_the_sdk_request_and_uses_its_context(platform, images, synapse_release):
    project, ids = _project(platform, [images["astronaut"]] * 2, classes=["face"])
    result = run_to_task(
        _job(project, synapse_release, model=12), platform=config_for(platform),
        action_cls=_plugin("sdk_style_params"), **FAST,
    )  # fmt: skip
    assert (result.success_count, result.failed_count) == (2, 0)
    title = platform.store.get_project(project)["title"]
    for tid in ids:
        (face,) = platform.store.get_task(tid)["data"]["objects"]
        assert face["properties"]["model"] == "12" and face["properties"]["project_title"] == title


def test_the_sdk_template_on_the_file_method(platform):
    """The template's file hook returns `{}` (its TODO): each task fails saying so, nothing is
    overwritten with nothing; the template itself loads and runs as it is."""
    units = [good_unit(platform, i, "template") for i in range(3)]
    project, ids = make_project(platform, units)
    job = {"name": "Template_File", "project": project, "target_specification_name": "annotation_data"}
    result = run_to_task(job, platform=config_for(platform), action_cls=_plugin("sdk_template"), **FAST)
    assert (result.success_count, result.failed_count) == (0, 3)
    assert {f.error for f in result.failures} == {
        "convert_data_from_file returned no data; nothing is written"
    }
    assert platform.store.history_counts(task_ids=ids) == {}


def _refused(platform, job: dict) -> str:
    from ray import serve

    before = set(serve.status().applications)
    with pytest.raises(ToTaskError) as info:
        run_to_task(job, platform=config_for(platform), **FAST)
    assert set(serve.status().applications) <= before  # nothing was deployed
    return str(info.value)


def test_a_bad_parameter_value_is_refused_before_anything_is_deployed(platform, images):
    project, ids = _project(platform, [images["astronaut"]], classes=["face"])
    job = _job(
        project, _faces_release(platform, "1.0.1-params"), pre_processor_params={"confidence_threshold": 1.5}
    )
    message = _refused(platform, job)
    assert message.startswith("Invalid pre_processor_params") and "confidence_threshold" in message
    assert platform.store.history_counts(task_ids=ids) == {}


def test_a_device_the_app_cannot_use_is_refused(platform, images):
    project, ids = _project(platform, [images["astronaut"]], classes=["face"])
    job = _job(project, _faces_release(platform, "1.0.1-device"),
               pre_processor_params={"model_config": {"device": "cuda"}})  # fmt: skip
    message = _refused(platform, job)
    assert "device" in message and "cuda" in message
    assert platform.store.history_counts(task_ids=ids) == {}


def test_an_unmapped_label_is_refused_with_both_lists_and_label_map_fixes_it(platform, images):
    project, ids = _project(platform, [images["astronaut"]], classes=["Person", "Car"])
    release = _faces_release(platform)
    message = _refused(platform, _job(project, release))
    assert "'face'" in message and "'Person' (id 1)" in message and "'Car' (id 2)" in message
    assert platform.store.history_counts(task_ids=ids) == {}
    result = run_to_task(
        _job(project, release, label_map={"face": "Person"}), platform=config_for(platform), **FAST
    )
    assert result.success_count == 1
    (face,) = platform.store.get_task(ids[0])["data"]["objects"]
    assert (face["class_id"], face["properties"]["label"]) == (1, "Person")
    assert 0.5 <= face["properties"]["confidence"] <= 1.0  # the score stays on the object


def test_a_release_that_picks_its_model_needs_model(platform, images, synapse_release):
    project, _ = _project(platform, [images["astronaut"]], classes=["face"])
    message = _refused(platform, _job(project, synapse_release))
    assert message.startswith("Pre-processor needs a model")


@pytest.mark.slow
def test_empty_result_fail_and_skip(platform, images):
    project, ids = _project(platform, [images["coffee"], images["astronaut"]], classes=["face"])
    release = _faces_release(platform)
    failed = run_to_task(_job(project, release, empty_result="fail"), platform=config_for(platform), **FAST)
    assert (failed.success_count, failed.failed_count) == (1, 1)
    assert "holds no object" in failed.failures[0].error
    assert not platform.store.get_task(ids[0])["data"]
    skipped = run_to_task(_job(project, release, empty_result="skip"), platform=config_for(platform), **FAST)
    assert skipped.skipped_count == 1 and not platform.store.get_task(ids[0])["data"]
