"""cluster.yaml is a valid Ray cluster launcher config, and the capacity gate can read its node types."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

from totask_ray.serving.capacity import ClusterSnapshot, Verdict, assess, node_types_from_cluster_yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_the_schema_in_the_ray_wheel():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(load(), schema)


def test_pools_and_setup():
    config = load()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]["resources"]
    assert "GPU" not in head and head["CPU"] == 0, "the head must offer no CPU: work lands on workers"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu_only = [n for n, t in types.items() if "GPU" not in t["resources"] and n != config["head_node_type"]]
    assert gpu and cpu_only
    for spec in types.values():
        assert all(isinstance(v, int) for v in spec["resources"].values())
    assert any("totask-ray" in cmd and "[models]" in cmd for cmd in config["setup_commands"])


def test_capacity_reads_its_node_types():
    types = {t.name: t for t in node_types_from_cluster_yaml(ROOT / "cluster.yaml")}
    assert types["gpu_workers"].resources["GPU"] == 1 and types["gpu_workers"].max_workers == 2
    assert types["head"].max_workers == 0
    head_only = ClusterSnapshot(totals=[{"CPU": 2.0}], available=[{"CPU": 2.0}])
    verdict = assess({"CPU": 1.0, "GPU": 1.0}, 2, head_only, list(types.values())).verdict
    assert verdict is Verdict.FITS_AFTER_SCALING
