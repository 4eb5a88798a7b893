"""The capacity gate: pure first-fit placement on plain dicts, then a real two-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from totask_ray.serving.capacity import (
    CapacityError,
    ClusterSnapshot,
    NodeType,
    Verdict,
    assess,
    check_capacity,
    max_replicas,
    node_types_from_cluster_config,
    node_types_from_cluster_yaml,
    pack,
)

ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3

# Two CPU nodes (4 CPUs each, one half busy) and no GPU.
CPU_CLUSTER = ClusterSnapshot(
    totals=[{"CPU": 4.0, "memory": 8 * GiB}, {"CPU": 4.0, "memory": 8 * GiB}],
    available=[{"CPU": 1.0, "memory": 2 * GiB}, {"CPU": 4.0, "memory": 8 * GiB}],
)
GPU_POOL = NodeType("gpu_workers", {"CPU": 4.0, "GPU": 1.0}, max_workers=2)


def test_pack_is_first_fit_per_node():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert pack({"CPU": 1.0}, 4, nodes) == 4
    assert pack({"CPU": 1.5}, 4, nodes) == 2  # never split a replica across nodes
    assert pack({"CPU": 3.0}, 1, nodes) == 0
    assert pack({"CPU": 0.5, "GPU": 0.1}, 1, nodes) == 0  # a resource a node lacks is zero
    assert pack({"CPU": 0.3333}, 3, [{"CPU": 0.9999}]) == 3  # fixed-point slack
    assert max_replicas({"CPU": 1.0, "GPU": 0.5}, {"CPU": 8.0, "GPU": 1.0}) == 2


def test_fits_now():
    report = assess({"CPU": 4.0}, 1, CPU_CLUSTER)
    assert report.verdict is Verdict.FITS_NOW


def test_busy_fits_totals_not_what_is_free():
    report = assess({"CPU": 4.0}, 2, CPU_CLUSTER)
    assert report.verdict is Verdict.BUSY
    assert "not what is free" in report.message


def test_fits_after_scaling_with_declared_node_types():
    report = assess({"CPU": 1.0, "GPU": 1.0}, 2, CPU_CLUSTER, [GPU_POOL])
    assert report.verdict is Verdict.FITS_AFTER_SCALING
    assert "gpu_workers" in report.message


def test_fits_after_scaling_from_autoscaler_node_types():
    snap = ClusterSnapshot(CPU_CLUSTER.totals, CPU_CLUSTER.available, node_types=[GPU_POOL])
    assert assess({"GPU": 1.0}, 1, snap).verdict is Verdict.FITS_AFTER_SCALING


def test_never_fits_message_names_the_shortfall():
    with pytest.raises(CapacityError) as info:
        check_capacity({"CPU": 1.0, "GPU": 1.0}, 2, CPU_CLUSTER, name="yolo@1.0")
    msg = str(info.value)
    assert msg.startswith("pre-processor yolo@1.0 needs GPU 1 x 2 replicas; the cluster has GPU 0")
    assert "its node types add none" in msg
    assert info.value.report.verdict is Verdict.NEVER_FITS
    assert isinstance(info.value, RuntimeError)


def test_never_fits_because_node_types_add_too_few():
    report = assess({"GPU": 1.0}, 3, CPU_CLUSTER, [GPU_POOL])
    assert report.verdict is Verdict.NEVER_FITS
    assert "add too few (gpu_workers: up to 2 x GPU 1)" in report.message


def test_never_fits_one_node_rule_and_memory():
    # 8 CPUs in total, 4 per node: a 6-CPU replica never fits
    report = assess({"CPU": 6.0}, 1, CPU_CLUSTER)
    assert report.verdict is Verdict.NEVER_FITS
    assert "the cluster has CPU 8 (at most 4 on one node)" in report.message
    report = assess({"CPU": 1.0, "memory": 500 * GiB}, 1, CPU_CLUSTER)
    assert "needs memory 500 GiB" in report.message


def test_never_fits_combination_only():
    # Each resource exists on some node, never together.
    snap = ClusterSnapshot(totals=[{"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}], available=[{}, {}])
    report = assess({"CPU": 4.0, "GPU": 1.0}, 1, snap)
    assert report.verdict is Verdict.NEVER_FITS
    assert "no node (nor any node type) offers all of it together" in report.message


def test_node_types_from_cluster_yaml_mapping_and_global_cap():
    types = node_types_from_cluster_yaml(
        {
            "cluster_name": "x",
            "max_workers": 3,
            "available_node_types": {
                "head": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
                "gpu": {
                    "resources": {"CPU": 4, "GPU": 1},
                    "node_config": {},
                    "min_workers": 0,
                    "max_workers": 10,
                },
            },
        }
    )
    assert types == [NodeType("head", {"CPU": 2.0}, 0), NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 3, 0)]


def test_node_types_from_gcs_cluster_config():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name = "gpu"
    group.resources["GPU"] = 1
    group.max_count = 2
    group.min_count = 0
    assert node_types_from_cluster_config(None) is None
    assert node_types_from_cluster_config(config) == [NodeType("gpu", {"GPU": 1.0}, 2, 0)]


def test_reads_the_repo_cluster_yaml():
    types = {t.name: t for t in node_types_from_cluster_yaml(ROOT / "cluster.yaml")}
    snap = ClusterSnapshot(totals=[{"CPU": 2.0}], available=[{"CPU": 2.0}])
    assert assess({"GPU": 1.0}, 2, snap, list(types.values())).verdict is Verdict.FITS_AFTER_SCALING
    assert assess({"GPU": 1.0}, 3, snap, list(types.values())).verdict is Verdict.NEVER_FITS


@pytest.mark.slow
def test_on_a_real_two_node_cluster():
    """Head (2 CPU, no GPU) + worker (2 CPU, 1 GPU): real raylets, logical resources."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_multinode_capacity.py"))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["nodes"] == 2
    assert out["autoscaler_node_types"] is None  # a plain local cluster reports no autoscaler config
    assert out["idle"] == {
        "cpu1": "fits_now",
        "cpu3_one_node_rule": "never_fits",
        "gpu1x1": "fits_now",
        "gpu1x2": "never_fits",
        "gpu1x2_scaling": "fits_after_scaling",
        "gpu1x4_scaling": "never_fits",
    }
    assert out["held"] == {"gpu1x1": "busy", "cpu1": "fits_now", "gpu1x2_scaling": "fits_after_scaling"}
    assert "(at most 2 on one node)" in out["messages"]["cpu3_one_node_rule"]
    assert out["gate"] == {"type": "CapacityError", "is_runtime_error": True}
    assert out["gate_message"].startswith(
        "pre-processor gpu-model@1.0.0 needs GPU 1 x 2 replicas; the cluster has GPU 1 and its node types add none"
    )
    assert out["apps_after_gate"] == []  # refused before anything was dispatched
