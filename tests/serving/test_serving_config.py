"""Strict release configs: unknown keys, wrong types and conflicts fail with the key and the fix."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from totask_ray.serving.config import (
    PreProcessorRelease,
    ReleaseConfig,
    ReleaseConfigError,
    load_release_config,
    parse_release_config,
)

ROOT = Path(__file__).resolve().parents[2]


def base(**resources) -> dict:
    return {
        "code": "faces",
        "name": "Faces",
        "version": "1.0.0",
        "actions": {
            "inference": {"required_resources": resources},
            "deployment": {"entrypoint": "serve_apps.faces.app:build_app"},
        },
    }


@pytest.mark.parametrize("app", ["faces", "ocr"])
def test_shipped_app_configs_load(app):
    cfg = load_release_config(ROOT / "serve_apps" / app)
    assert cfg.code == app and cfg.actions.deployment.entrypoint == f"serve_apps.{app}.app:build_app"
    assert cfg.actions.inference.required_resources.required_gpu_count == 0  # CPU-only apps say so


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ReleaseConfigError) as info:
        parse_release_config(base(num_gpu=1))
    msg = str(info.value)
    assert "actions.inference.required_resources.num_gpu: unknown key" in msg
    assert "did you mean 'num_gpus'" in msg


def test_unknown_top_level_and_nested_keys():
    data = base()
    data["actions"]["deployment"]["serve_options"] = {"batch": {"max_batch": 4}}
    with pytest.raises(
        ReleaseConfigError, match=r"serve_options\.batch\.max_batch: unknown key; did you mean"
    ):
        parse_release_config(data)
    with pytest.raises(ReleaseConfigError, match=re.escape("actions.deploy: unknown key")):
        parse_release_config({**base(), "actions": {"deploy": {}}})


@pytest.mark.parametrize(
    ("resources", "fragment"),
    [
        ({"required_gpu_count": -1}, "required_gpu_count: expected a finite number >= 0"),
        ({"required_gpu_count": True}, "expected a number, got a boolean"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"memory": "4GiB"}, "memory"),
    ],
)
def test_bad_values(resources, fragment):
    with pytest.raises(ReleaseConfigError, match=fragment):
        parse_release_config(base(**resources))


def test_missing_and_unquoted_version():
    data = base()
    del data["code"]
    with pytest.raises(ReleaseConfigError, match="code: required key is missing"):
        parse_release_config(data)
    with pytest.raises(ReleaseConfigError, match=re.escape('quote it in YAML, e.g. version: "1.0"')):
        parse_release_config({**base(), "version": 1.0})


def test_conflicting_replica_counts():
    data = base(num_replicas=2)
    data["actions"]["deployment"]["serve_options"] = {"num_replicas": 1}
    with pytest.raises(ReleaseConfigError, match="num_replicas is declared twice"):
        parse_release_config(data)


def test_entrypoint_shape():
    data = base()
    data["actions"]["deployment"]["entrypoint"] = "serve_apps/faces/app.py"
    with pytest.raises(ReleaseConfigError, match=re.escape("actions.deployment.entrypoint")):
        parse_release_config(data)


def test_load_errors(tmp_path):
    with pytest.raises(ReleaseConfigError, match="no such file"):
        load_release_config(tmp_path / "missing.yaml")
    (tmp_path / "config.yaml").write_text("code: [unclosed\n")
    with pytest.raises(ReleaseConfigError, match="not valid YAML"):
        load_release_config(tmp_path)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ReleaseConfigError, match="expected a mapping"):
        load_release_config(tmp_path)


def test_release_names_and_route():
    cfg = ReleaseConfig.model_validate(base())
    rel = PreProcessorRelease(id=7, code="faces", version="1.0.0", config=cfg)
    assert rel.app_name == "faces@1.0.0"
    assert rel.route_prefix == "/" + hashlib.md5(b"faces@1.0.0").hexdigest()
    with pytest.raises(ValueError, match=re.escape("carries a config for faces@1.0.0")):
        PreProcessorRelease(id=7, code="faces", version="2.0.0", config=cfg)


# ------------------------------------------------------------------ releases as the Synapse SDK writes them


def sdk_release(**inference) -> dict:
    """A pre-processor release config as the SDK publishes it (PluginConfig keys, dumped with nulls)."""
    return {
        "name": "YOLO pre-annotation",
        "code": "yolo-pre",
        "version": "1.2.0",
        "variant": None,
        "category": "pre_annotation",
        "description": "Boxes from a YOLO model",
        "readme": "README.md",
        "package_manager": "uv",
        "package_manager_options": ["--no-cache"],
        "wheels_dir": "wheels",
        "env": {"OMP_NUM_THREADS": "2"},
        "runtime_env": {"pip": ["ultralytics"]},
        "data_type": "image",
        "tasks": ["image.object_detection"],
        "supported_data_type": ["image"],  # the SDK's accepted singular spelling
        "supported_annotation_tools": {"image": ["bounding_box", "polygon"]},
        "annotation_category": None,
        "annotation_type": "bbox",
        "smart_tool_type": None,  # what the SDK's own template writes
        "requires": {"sdk": ">=2026.1.0", "python": ">=3.10,<3.13", "cuda": None},
        "dependencies": {"yolo-base": ">=1.0"},
        "tags": ["detection"],
        "actions": {
            "inference": {
                "name": "inference",
                "description": "Detect objects",
                "entrypoint": "plugin.inference:YoloDeployment",
                "method": "serve",
                "params_schema": None,
                "input_type": "image",
                "output_type": "annotations",
                "serve_options": {
                    "max_ongoing_requests": 10,
                    "max_queued_requests": 100,
                    "health_check_period_s": 5,
                    "batch": {"max_batch_size": 16, "batch_wait_timeout_s": 0.1},
                },
                "required_resources": {"required_cpu_count": 2, "required_gpu_count": 1},
                **inference,
            },
            "train": {"entrypoint": "plugin.train:TrainAction", "method": "job", "serve_options": None},
            "to_task": {"entrypoint": "plugin.to_task:ToTask", "method": "job"},
        },
    }


def test_a_realistic_sdk_release_parses():
    cfg = parse_release_config(sdk_release())
    assert cfg.category == "pre_annotation" and cfg.requires.python == ">=3.10,<3.13"
    assert cfg.supported_data_types == ["image"] and cfg.actions.deployment is None
    assert cfg.actions.model_extra["train"].method == "job"
    target = cfg.deploy_target
    assert target is not None and target.source == "inference" and target.key == "actions.inference"
    assert target.entrypoint == "plugin.inference:YoloDeployment"
    assert target.serve_options.batch.max_batch_size == 16 and target.serve_options.batch_declared
    assert cfg.serve_options is target.serve_options
    rel = PreProcessorRelease.from_config(cfg, id=9)
    assert rel.convention == "synapse" and rel.requires_model is True  # the SDK's way: one POST per task
    assert rel.deploy_target == target and rel.max_batch_size == 16


def test_sdk_release_with_nulls_for_every_optional_section():
    data = sdk_release(serve_options=None, required_resources=None)
    data["actions"]["inference"]["entrypoint"] = ""
    cfg = parse_release_config({**data, "requires": None, "env": None})
    assert cfg.deploy_target is None  # nothing to deploy; the SDK's default entrypoint is ''
    assert cfg.max_batch_size == 8


@pytest.mark.parametrize(
    ("path", "key", "suggestion"),
    [
        (("actions", "inference", "serve_options"), "max_ongoing_request", "max_ongoing_requests"),
        (("actions", "inference"), "entrypiont", "entrypoint"),
        (("actions", "train"), "entry_point", "entrypoint"),
        (("requires",), "pyhton", "python"),
        ((), "categroy", "category"),
        (("actions", "inference", "required_resources"), "required_gpus", "required_gpu_count"),
    ],
)
def test_unknown_sdk_shaped_key_fails_with_its_path_and_a_suggestion(path, key, suggestion):
    data = sdk_release()
    node = data
    for part in path:
        node = node[part]
    node[key] = 1
    with pytest.raises(ReleaseConfigError) as info:
        parse_release_config(data, source="plugin release 9")
    msg = str(info.value)
    full = ".".join((*path, key))
    assert msg.startswith(f"plugin release 9: {full}: unknown key; did you mean '{suggestion}'?"), msg


def test_sdk_values_are_typed():
    with pytest.raises(
        ReleaseConfigError, match=r"actions\.inference\.method: Input should be 'job', 'task'"
    ):
        parse_release_config(sdk_release(method="lambda"))
    with pytest.raises(ReleaseConfigError, match=r"actions\.inference\.entrypoint: String should match"):
        parse_release_config(sdk_release(entrypoint="plugin/inference.py"))
    with pytest.raises(ReleaseConfigError, match=r"tags\.0: Input should be a valid string"):
        parse_release_config({**sdk_release(), "tags": [{"x": 1}]})
    with pytest.raises(ReleaseConfigError, match="num_replicas and autoscaling_config are both set"):
        parse_release_config(sdk_release(serve_options={"num_replicas": 2, "autoscaling_config": {}}))


def test_any_action_name_but_a_near_miss_of_ours():
    data = sdk_release()
    data["actions"]["auto_label"] = {"entrypoint": "plugin.auto:Label"}
    data["actions"]["my_custom_step"] = {}
    assert set(parse_release_config(data).actions.model_extra) == {
        "train",
        "to_task",
        "auto_label",
        "my_custom_step",
    }
    data["actions"]["inferance"] = {}
    with pytest.raises(
        ReleaseConfigError, match=r"actions\.inferance: unknown key; did you mean 'inference'\?"
    ):
        parse_release_config(data)


def test_one_entrypoint_and_one_place_for_serve_options():
    data = sdk_release()
    data["actions"]["deployment"] = {"entrypoint": "serve_apps.faces.app:build_app"}
    with pytest.raises(ReleaseConfigError, match="two entrypoints to deploy"):
        parse_release_config(data)
    data = base()
    data["actions"]["inference"]["serve_options"] = {"max_ongoing_requests": 2}
    with pytest.raises(ReleaseConfigError, match="serve_options is declared twice"):
        parse_release_config(data)
    data = sdk_release(serve_options={"num_replicas": 2})
    data["actions"]["inference"]["required_resources"]["num_replicas"] = 3
    with pytest.raises(ReleaseConfigError, match=r"actions\.inference\.serve_options\.num_replicas=2"):
        parse_release_config(data)


def test_convention_defaults_from_the_shape_and_can_be_overridden():
    ours = parse_release_config(base())
    assert ours.deploy_target.source == "deployment"
    assert (ours.convention, ours.requires_model) == ("batched", False)
    forced = base()
    forced["actions"]["inference"]["convention"] = "synapse"
    assert parse_release_config(forced).convention == "synapse"
    assert parse_release_config(forced).requires_model is True
    sdk = parse_release_config(sdk_release(convention="batched"))
    assert (sdk.convention, sdk.requires_model) == ("batched", False)
    sdk = parse_release_config(sdk_release(requires_model=False))
    assert (sdk.convention, sdk.requires_model) == ("synapse", False)
    with pytest.raises(
        ReleaseConfigError, match=r"actions\.inference\.convention: Input should be 'batched'"
    ):
        parse_release_config(sdk_release(convention="http"))


@pytest.mark.parametrize("app", ["faces", "ocr"])
def test_shipped_apps_are_batched(app):
    rel = PreProcessorRelease.from_config(load_release_config(ROOT / "serve_apps" / app))
    assert rel.convention == "batched" and rel.requires_model is False
    assert rel.deploy_target.entrypoint == f"serve_apps.{app}.app:build_app"
