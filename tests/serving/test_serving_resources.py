"""The dispatch payload table (SYN-7005 / FR-8), row by row, and the deployment options it yields."""

from __future__ import annotations

import pytest

from totask_ray.serving.config import parse_release_config
from totask_ray.serving.resources import DeploymentArgs, Resources, deployment_args, dispatch_payload


def payload(**rr) -> dict:
    return Resources.from_required(rr).to_payload()


def test_documented_example():
    rr = {"required_cpu_count": 2, "required_gpu_count": 1, "num_replicas": 2, "memory": 4294967296}
    assert payload(**rr) == {"num_cpus": 2, "num_gpus": 1, "num_replicas": 2, "memory": 4294967296}


def test_num_cpus_row():
    assert payload(required_cpu_count=2, num_cpus=3)["num_cpus"] == 2  # preferred key wins
    assert payload(num_cpus=3)["num_cpus"] == 3  # fallback key
    assert payload(num_cpus=0.5)["num_cpus"] == 0.5
    assert payload()["num_cpus"] == 1  # default


def test_num_gpus_row():
    assert payload(required_gpu_count=1, num_gpus=2)["num_gpus"] == 1
    assert payload(num_gpus=2)["num_gpus"] == 2
    assert payload()["num_gpus"] == 0.1
    assert payload(required_gpu_count=0)["num_gpus"] == 0  # declared zero is not "missing"


def test_num_replicas_row_is_omitted_not_null():
    assert payload(num_replicas=3)["num_replicas"] == 3
    assert "num_replicas" not in payload()


def test_memory_row_alias_and_omission():
    assert payload(memory=10, memory_bytes=20)["memory"] == 10  # `memory` preferred
    assert payload(memory_bytes=20)["memory"] == 20  # alias, sent as `memory`
    p = payload()
    assert "memory" not in p and "memory_bytes" not in p
    assert p == {"num_cpus": 1, "num_gpus": 0.1}
    assert None not in payload(num_cpus=2).values()


def test_types_are_kept():
    p = payload(required_cpu_count=2, required_gpu_count=1)
    assert type(p["num_cpus"]) is int and type(p["num_gpus"]) is int


def test_unknown_keys_rejected():
    with pytest.raises(ValueError, match="num_gpu"):
        Resources.from_required({"num_gpu": 1})


def test_same_model_gives_deployment_options():
    res = Resources.from_required(
        {"required_cpu_count": 2, "required_gpu_count": 1, "num_replicas": 2, "memory": 5}
    )
    assert res.ray_actor_options() == {"num_cpus": 2, "num_gpus": 1, "memory": 5}
    assert res.bundle() == {"CPU": 2.0, "GPU": 1.0, "memory": 5.0}
    assert res.replicas() == 2
    assert Resources.from_payload(res.to_payload()) == res
    assert Resources.from_required({"required_gpu_count": 0}).bundle() == {"CPU": 1.0}


def test_deployment_args_from_release():
    cfg = parse_release_config(
        {
            "code": "faces",
            "name": "Faces",
            "version": "1.0.0",
            "actions": {
                "inference": {"required_resources": {"required_cpu_count": 2, "required_gpu_count": 0}},
                "deployment": {
                    "entrypoint": "serve_apps.faces.app:build_app",
                    "serve_options": {
                        "num_replicas": 3,
                        "max_ongoing_requests": 5,
                        "batch": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
                    },
                },
            },
        }
    )
    assert dispatch_payload(cfg) == {"num_cpus": 2, "num_gpus": 0}  # serve_options are not in the payload
    args = deployment_args(cfg)
    assert args == DeploymentArgs(
        ray_actor_options={"num_cpus": 2, "num_gpus": 0},
        num_replicas=3,
        max_ongoing_requests=5,
        max_batch_size=16,
        batch_wait_timeout_s=0.05,
    )
    assert args.deployment_options() == {
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0},
        "num_replicas": 3,
        "max_ongoing_requests": 5,
    }
    # what was dispatched wins over the config's own numbers
    assert deployment_args(cfg, {"num_cpus": 1, "num_gpus": 0, "num_replicas": 2}).num_replicas == 2


def test_deployment_args_from_an_sdk_release_with_the_entrypoint_on_inference():
    cfg = parse_release_config(
        {
            "code": "yolo-pre",
            "name": "YOLO",
            "version": "1.0.0",
            "category": "pre_annotation",
            "actions": {
                "inference": {
                    "entrypoint": "plugin.inference:YoloDeployment",
                    "method": "serve",
                    "required_resources": {"required_cpu_count": 2, "required_gpu_count": 1},
                    "serve_options": {
                        "num_replicas": 2,
                        "max_ongoing_requests": 10,
                        "max_queued_requests": 50,
                        "health_check_timeout_s": 30,
                        "batch": {"max_batch_size": 4, "batch_wait_timeout_s": 0.1},
                    },
                },
            },
        }
    )
    args = deployment_args(cfg)
    assert (args.max_batch_size, args.batch_wait_timeout_s, args.options) == (4, 0.1, {})
    assert args.deployment_options() == {
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 1},
        "num_replicas": 2,
        "max_ongoing_requests": 10,
        "max_queued_requests": 50,
        "health_check_timeout_s": 30,
    }
    assert dispatch_payload(cfg) == {"num_cpus": 2, "num_gpus": 1}
    assert Resources.from_required(cfg.actions.inference.required_resources).replicas(cfg.serve_options) == 2


def test_autoscaled_serve_options_replace_the_fixed_count():
    cfg = parse_release_config(
        {
            "code": "auto",
            "name": "Auto",
            "version": "1.0.0",
            "actions": {
                "inference": {
                    "entrypoint": "plugin.inference:Model",
                    "serve_options": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 4}},
                },
            },
        }
    )
    opts = deployment_args(cfg).deployment_options()
    assert "num_replicas" not in opts and opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4}
    assert Resources.from_required(None).replicas(cfg.serve_options) == 1  # the capacity gate counts one
