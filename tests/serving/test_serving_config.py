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
