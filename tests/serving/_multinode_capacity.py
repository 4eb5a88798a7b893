"""Run as a subprocess by test_serving_capacity.py: a real two-node cluster with logical resources.

A process can be connected to only one Ray cluster and the test session already has one, so this
script builds its own with ``ray.cluster_utils.Cluster`` and prints the verdicts as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)

import ray
from ray.cluster_utils import Cluster

from totask_ray.serving.capacity import CapacityError, NodeType, assess, read_cluster
from totask_ray.serving.config import PreProcessorRelease, parse_release_config
from totask_ray.serving.lifecycle import RayServeBackend, ensure_running


def release(**rr) -> PreProcessorRelease:
    cfg = parse_release_config(
        {
            "code": "gpu-model",
            "name": "GPU model",
            "version": "1.0.0",
            "actions": {
                "inference": {"required_resources": rr},
                "deployment": {"entrypoint": "serve_apps.faces.app:build_app"},
            },
        }
    )
    return PreProcessorRelease.from_config(cfg)


def main() -> None:
    node_args = {"include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, **node_args})
    cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    out: dict = {}
    try:
        snap = read_cluster()
        out["nodes"] = len(snap.totals)
        out["autoscaler_node_types"] = snap.node_types
        gpu_pool = [NodeType("gpu_workers", {"CPU": 4, "GPU": 1}, max_workers=2)]
        cases = {
            "cpu1": ({"CPU": 1}, 1, None),
            "cpu3_one_node_rule": ({"CPU": 3}, 1, None),  # 4 CPUs in total, but 2 per node
            "gpu1x1": ({"CPU": 1, "GPU": 1}, 1, None),
            "gpu1x2": ({"CPU": 1, "GPU": 1}, 2, None),
            "gpu1x2_scaling": ({"CPU": 1, "GPU": 1}, 2, gpu_pool),
            "gpu1x4_scaling": ({"CPU": 1, "GPU": 1}, 4, gpu_pool),
        }
        out["idle"] = {k: assess(b, n, snap, t).verdict.value for k, (b, n, t) in cases.items()}
        out["messages"] = {k: assess(b, n, snap, t).message for k, (b, n, t) in cases.items()}

        # The whole gate on a real backend: never_fits raises before anything is dispatched.
        backend = RayServeBackend()
        try:
            ensure_running(
                release(required_gpu_count=1, num_replicas=2), backend, poll_interval_s=0.1, timeout_s=5
            )
            out["gate"] = "no error"
        except CapacityError as exc:
            out["gate"] = {"type": type(exc).__name__, "is_runtime_error": isinstance(exc, RuntimeError)}
            out["gate_message"] = str(exc)
        from ray import serve

        out["apps_after_gate"] = list(serve.status().applications)

        # Busy: an actor holds the only GPU; wait until the GCS view of free resources shows it.
        holder = ray.remote(num_gpus=1, num_cpus=0)(type("Holder", (), {"ping": lambda self: 1})).remote()
        ray.get(holder.ping.remote())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            snap = read_cluster()
            if sum(a.get("GPU", 0) for a in snap.available) < 1:
                break
            time.sleep(0.2)
        out["held"] = {
            "gpu1x1": assess({"CPU": 1, "GPU": 1}, 1, snap).verdict.value,
            "cpu1": assess({"CPU": 1}, 1, snap).verdict.value,
            "gpu1x2_scaling": assess({"CPU": 1, "GPU": 1}, 2, snap, gpu_pool).verdict.value,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
