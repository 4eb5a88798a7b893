"""The sizing arithmetic, on capacities: the annotator pool (`pipeline.sizing.plan_pool`), replicas
that grow with the cluster (`capacity.plan_replicas`), Serve autoscaling for a planned count
(`lifecycle.autoscaling_for`) and where node types come from (`serving.node_types`).

The runs on real growing clusters are in test_cluster_sizing.py; these pin the numbers the plan's log
line reports, at sizes this machine cannot start (100 nodes, thousands of CPUs).
"""

from __future__ import annotations

import time

import pytest
import yaml

from totask_ray.errors import CriticalError
from totask_ray.pipeline.sizing import plan_pool
from totask_ray.serving.capacity import ClusterSnapshot, most_replicas, plan_replicas
from totask_ray.serving.lifecycle import Scaling, autoscaling_for
from totask_ray.serving.node_types import (
    NodeType,
    local_monitor,
    monitor_config_path,
    node_types_from_cluster_yaml,
    running_by_type,
)

HUNDRED = [{"CPU": 8.0}] * 100


def snapshot(totals, available=None, types=None, running=None) -> ClusterSnapshot:
    return ClusterSnapshot(
        totals=totals, available=available if available is not None else totals, node_types=types,
        running=running or {}, types_source="test",
    )  # fmt: skip


def test_a_hundred_nodes_are_a_pool_of_hundreds_not_sixteen():
    plan = plan_pool(snapshot(HUNDRED), actor_cpus=0.5, batches=100_000)
    # 8 CPU less a tenth for the reads hold 15 actors of 0.5: 1,500 over 100 nodes
    assert (plan.initial, plan.most, plan.fixed) == (1, 1500, False)
    assert "1500 fit the cluster once grown, bounded by the cluster once grown" in plan.why
    assert "100 nodes, 800 CPU up" in plan.describe("FileAnnotator", 0.5)


def test_the_pool_counts_nodes_the_autoscaler_can_add():
    head = [{"CPU": 1.0}]
    cpu = NodeType("cpu", {"CPU": 8.0}, max_workers=10)
    plan = plan_pool(snapshot(head, types=[cpu], running={"cpu": 2}), actor_cpus=1, batches=10**6)
    assert plan.fit_now == 0 and plan.most == 7 * 8  # 8 more nodes of 7 actors; the head holds none
    # whole from the start: Ray Data would never create an actor beyond the nodes that are up
    assert plan.initial == plan.most
    assert "56 FileAnnotator actors from the start (0 fit now" in plan.describe("FileAnnotator", 1)
    assert "none fits now" in plan.why and "node types add up to 8 x (8 CPU) (cpu)" in plan.why


def test_the_pool_is_bounded_by_its_batches_and_max_actors_and_leaves_the_replicas_room():
    s = snapshot(HUNDRED)
    assert plan_pool(s, actor_cpus=0.5, batches=7).most == 7
    capped = plan_pool(s, actor_cpus=0.5, batches=10**6, max_actors=40)
    assert capped.most == 40 and "bounded by --max-actors" in capped.why
    # 64 CPU held back for replicas at their most: 128 fewer actors of 0.5
    assert plan_pool(s, actor_cpus=0.5, batches=10**6, reserved_cpus=64).most == 1500 - 128
    fixed = plan_pool(s, actor_cpus=0.5, batches=3, num_actors=12)
    assert (fixed.initial, fixed.most, fixed.fixed) == (12, 12, True)


def test_a_fixed_pool_must_leave_room_for_the_reads():
    """4 actors of 0.5 on a 2-CPU Ray would take every CPU and starve the reads (measured: no
    progress for 300 s): refused, naming the 3 that fit; 3 are accepted."""
    two = snapshot([{"CPU": 2.0}])
    with pytest.raises(
        CriticalError, match=r"--num-actors 4 at 0.5 CPU each does not fit.*at most 3 such actors"
    ):
        plan_pool(two, actor_cpus=0.5, batches=100, num_actors=4)
    assert plan_pool(two, actor_cpus=0.5, batches=100, num_actors=3).most == 3
    # nodes the autoscaler may add count: the fixed pool waits for them rather than being refused
    grows = snapshot([{"CPU": 2.0}], types=[NodeType("cpu", {"CPU": 2.0}, max_workers=1)])
    assert plan_pool(grows, actor_cpus=0.5, batches=100, num_actors=6).most == 6


def test_no_room_now_or_ever_is_refused_with_what_to_do():
    with pytest.raises(CriticalError, match="No room for annotator actors: each needs 4 CPU") as exc:
        plan_pool(
            snapshot([{"CPU": 2.0}], types=[NodeType("small", {"CPU": 2.0}, 3)]), actor_cpus=4, batches=9
        )
    assert "node types add no node that holds one" in str(exc.value)


def test_replicas_start_with_what_fits_and_grow_to_what_the_grown_cluster_holds():
    gpu = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, max_workers=32)
    s = snapshot([{"CPU": 4.0}], types=[gpu])
    plan = plan_replicas({"CPU": 1.0, "GPU": 1.0}, s.available, grown=s.grown(), grown_from=s.describe())
    assert (plan.replicas, plan.max_replicas, plan.fits_now) == (1, 32, False)
    line = plan.describe("ocr@1")
    assert "none fits now, 1 starts on a node to come, up to 32 once the cluster has grown" in line
    assert "node types add up to 32 x (8 CPU + 1 GPU) (gpu)" in line


def test_most_replicas_is_arithmetic_over_a_thousand_node_pool():
    groups = [({"CPU": 8.0, "GPU": 1.0}, 1000)]
    start = time.perf_counter()
    assert most_replicas({"CPU": 1.0, "GPU": 1.0}, groups, decode_cpus=0.5, reserve_cpus=0.1) == 1000
    assert time.perf_counter() - start < 0.5  # groups, not nodes: no per-node loop


def test_serve_autoscaling_starts_at_the_plan_and_gives_it_back_unless_kept_warm():
    plan = plan_replicas({"CPU": 1.0}, [{"CPU": 8.0}], grown=[({"CPU": 8.0}, 5)])
    # the grown 40 CPU: 31 replicas first-fit leave the 16 decode actors theirs (8+8+8+7 on four nodes, the fifth left to them)
    assert (plan.replicas, plan.max_replicas) == (4, 31)
    cfg = autoscaling_for(plan, Scaling(keep_warm=False, target_ongoing=2, downscale_delay_s=60))
    # held at the plan while a run holds it (serving/hold.py), to zero once idle after
    assert cfg == {"min_replicas": 0, "initial_replicas": 4, "max_replicas": 31,
                   "target_ongoing_requests": 2, "downscale_delay_s": 60,
                   "policy": {"policy_function": "totask_ray.serving.hold:hold_while_leased"}}  # fmt: skip
    warm = Scaling(keep_warm=True, target_ongoing=2, downscale_delay_s=60)
    assert autoscaling_for(plan, warm)["min_replicas"] == 4
    assert "policy" not in autoscaling_for(plan, warm)  # kept warm: Serve's own policy, floor at the plan


def test_node_types_from_a_cluster_yaml_give_the_head_no_workers(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "cluster_name": "x",
                "provider": {"type": "aws"},
                "head_node_type": "head",
                "available_node_types": {
                    "head": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 4},
                    "gpu": {
                        "resources": {"CPU": 8, "GPU": 1},
                        "node_config": {},
                        "min_workers": 0,
                        "max_workers": 6,
                    },
                },
            }
        )
    )
    types = {t.name: t for t in node_types_from_cluster_yaml(path)}
    assert types["head"].max_workers == 0 and types["gpu"].max_workers == 6
    assert types["gpu"].resources == {"CPU": 8.0, "GPU": 1.0}


def test_the_autoscalers_report_says_what_runs_and_where_its_config_is():
    status = {"autoscaler_report": {"active_nodes": {"gpu": 1}, "idle_nodes": {"gpu": 1, "cpu": 2}}}
    assert running_by_type(status) == {"gpu": 2, "cpu": 2}
    assert local_monitor({"monitor_pid": "not a pid"}, None) is None
    assert local_monitor({"monitor_pid": 2**22 + 12345}, None) is None  # no such process here
    cmd = ["python", "monitor.py", "--gcs-address=127.0.0.1:6379", "--autoscaling-config=~/c.yaml"]
    assert monitor_config_path(cmd).name == "c.yaml" and "~" not in str(monitor_config_path(cmd))
    assert monitor_config_path(["python", "monitor.py"]) is None


def test_node_types_from_a_kuberay_raycluster_manifest(tmp_path):
    """`--cluster-yaml` also takes a KubeRay RayCluster: worker groups, their CPUs and GPUs as Ray
    sees them (rayStartParams first, else the container's limits) and their maxReplicas."""
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "totask"},
        "spec": {
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [{}]}}},
            "workerGroupSpecs": [
                {"groupName": "cpu", "minReplicas": 1, "maxReplicas": 10, "rayStartParams": {},
                 "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "8", "memory": "32Gi"}}}]}}},
                {"groupName": "gpu", "minReplicas": 0, "maxReplicas": 4, "rayStartParams": {"num-cpus": "3500m"},
                 "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "4", "nvidia.com/gpu": 1}}}]}}},
            ],
        },
    }  # fmt: skip
    path = tmp_path / "raycluster.yaml"
    path.write_text(yaml.safe_dump(manifest))
    types = {t.name: t for t in node_types_from_cluster_yaml(path)}
    assert types["cpu"] == NodeType("cpu", {"CPU": 8.0}, max_workers=10, min_workers=1)
    assert types["gpu"] == NodeType("gpu", {"CPU": 3.5, "GPU": 1.0}, max_workers=4, min_workers=0)
    # a GPU release on this cluster, with no GPU node up, plans for the gpu group
    s = snapshot([{"CPU": 8.0}], types=list(types.values()), running={"cpu": 1})
    assert s.grown_total("GPU") == 4
