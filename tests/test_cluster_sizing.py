"""Sized for the cluster, not the box: runs against clusters that grow (Ray's fake multi-node
autoscaler, `devtools.fake_cluster`: real raylets for declared node types, GPUs logical) and a
static four-node cluster (`ray.cluster_utils.Cluster`).

Each run is its own driver process (`devtools/sized_run.py`, shared with `bench scaleout`): this
process is connected to the suite's session cluster, and Ray allows one per process. The plan's log lines are printed, so
`pytest -s` shows what each run sized and from what.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, cli_env, good_unit, make_project, read_report

from devtools.fake_cluster import FakeCluster, fake_autoscaling_cluster
from devtools.sized_run import gpu_ocr_release, read_summary

# Real clusters that add and release nodes: minutes on a loaded 2-core box, not the suite's 300 s default
pytestmark = pytest.mark.timeout(600)


def _plan_lines(stderr: str) -> list[str]:
    keys = ("annotator pool:", "pre-processor ", "autoscaler is adding", "scales with Serve")
    return [line for line in stderr.splitlines() if any(k in line for k in keys)]


def _run(
    platform, tmp_path: Path, cluster: FakeCluster, params: dict, timeout: float = 400, **spec
) -> tuple[dict, str]:
    path = tmp_path / f"spec{len(list(tmp_path.glob('spec*')))}.json"
    path.write_text(
        json.dumps(
            {
                "address": cluster.address,
                "url": platform.url,
                "token": platform.token,
                "params": params,
                **spec,
                # the ledger in the test's own folder; the driver's stacks before it is killed
                "options": {"ledger": str(tmp_path / "ledgers"), **spec.get("options", {})},
                "stacks_after_s": timeout - 20,
            }
        )
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "devtools.sized_run", str(path)],
            env=cluster.driver_env(cli_env(platform, PYTHONPATH=str(REPO))), cwd=REPO,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:  # what the driver said so far, to see where it was
        said, printed = (
            out.decode(errors="replace") if isinstance(out, bytes) else out or ""
            for out in (exc.stderr, exc.stdout)
        )
        pytest.fail(
            f"the run's driver was still going after {timeout:g} s (its stacks at {timeout - 20:g} s are in its "
            f"log); its log:\n{said[:3000]}\n[...]\n{said[-9000:]}\nits stdout (workers, autoscaler):\n{printed[-3000:]}"
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(path)
    assert summary is not None, (
        f"the driver exited 0 without writing its summary; its log:\n{proc.stderr[-4000:]}"
    )
    print("\n".join(_plan_lines(proc.stderr)))
    print(json.dumps({k: v for k, v in summary.items() if k != "seen"}))
    return summary, proc.stderr


@pytest.mark.slow
def test_a_gpu_pool_from_zero_serves_the_run_and_is_given_back(platform, tmp_path):
    """The release needs 1 GPU per replica, asks for `device: cuda`, and the head has no GPU: the
    `gpu` node type (min 0) is the only place it can run. The run is accepted at prepare, the
    autoscaler launches the GPU node, every task is written, and after the run the replica scales to
    zero and the cluster releases the node."""
    from totask_ray.embedded.seeds import seed_ocr_demo

    seeded = seed_ocr_demo(platform.store, platform.media_dir, tasks=6, seed=5)
    release, app = gpu_ocr_release(platform.store, "1.0.0-fromzero")
    params = {"name": "Gpu_From_Zero", "project": seeded["project"], "method": "inference",
              "pre_processor": release, "batch_size": 2,
              "pre_processor_params": {**seeded["pre_processor_params"], "model_config": {"device": "cuda"}}}  # fmt: skip
    with fake_autoscaling_cluster(
        {"cpu": {"CPU": 2}, "gpu": {"CPU": 2, "GPU": 1}}, max_workers={"cpu": 1, "gpu": 1}, idle_timeout_s=3
    ) as cluster:
        summary, stderr = _run(platform, tmp_path, cluster, params,
                               options={"scale_down_delay_s": 2, "actor_cpus": 0.5, "serve_ready_timeout_s": 120,
                                        "node_boot_timeout_s": 150},
                               settle={"app": app, "nodes": 1, "timeout_s": 150})  # fmt: skip
    assert summary["error"] is None, stderr[-3000:]
    assert (summary["success"], summary["failed"]) == (6, 0), stderr[-3000:]
    assert summary["first_gpu_node_s"] is not None, f"no GPU node was ever up: {summary['seen']}"
    # the model's own words on the platform: the tasks were written through the GPU node's replica
    for tid, text in seeded["truth"].items():
        objs = platform.store.get_task(int(tid))["data"]["objects"]
        assert "\n".join(o["properties"]["text"] for o in objs) == text
    assert summary["replicas_settled"] == 0, summary
    assert summary["nodes_settled"] == 1, f"the cluster kept nodes after the run: {summary}"
    lines = _plan_lines(stderr)
    assert any("autoscaler is adding a node" in line for line in lines), lines
    assert any(f"pre-processor {app}: 1 replica" in line and "planned" in line for line in lines), lines


@pytest.fixture(scope="module")
def remote_platform(tmp_path_factory):
    """The embedded platform answering 20 ms late, as a platform across a network does: a run of a
    few hundred tasks then lasts long enough (tens of seconds) for Ray Data's cluster autoscaler,
    which asks for nodes at most every 10 s on a rolling utilization window, to ask for them."""
    from totask_ray.embedded.server import LocalPlatform

    with LocalPlatform(data_dir=tmp_path_factory.mktemp("remote"), latency_ms=20) as lp:
        yield lp


@pytest.mark.slow
def test_a_file_run_grows_its_pool_onto_nodes_the_autoscaler_adds(remote_platform, tmp_path):
    """The head holds one annotator actor (1 CPU, 0.5 each, a tenth kept for the reads); the `cpu`
    node type can add three nodes of one actor each. The plan sizes the pool at four, and the work
    lands on nodes that did not exist when the run started. Pages of 50 ids: each page is a block,
    and a block goes to one actor, so the default 500 would hand 600 tasks to two actors at most."""
    platform = remote_platform
    units = [good_unit(platform, i, "grow") for i in range(600)]
    project, ids = make_project(platform, units)
    report = tmp_path / "grow.jsonl"
    params = {"name": "Grow", "project": project, "target_specification_name": "annotation_data",
              "batch_size": 10}  # fmt: skip
    with fake_autoscaling_cluster({"cpu": {"CPU": 1}}, max_workers={"cpu": 3}, head_cpus=1) as cluster:
        summary, stderr = _run(platform, tmp_path, cluster, params,
                               options={"actor_cpus": 0.5, "concurrency": 1, "page_size": 50, "report": str(report)})  # fmt: skip
    assert summary["error"] is None and (summary["success"], summary["failed"]) == (len(ids), 0), stderr[
        -3000:
    ]
    assert any(
        "annotator pool: 4 FileAnnotator actors from the start (1 fit now" in line
        for line in _plan_lines(stderr)
    )
    records = read_report(report).values()
    used = {rec["node"] for rec in records}
    print("tasks per node:", {n[-5:]: sum(1 for r in records if r["node"] == n) for n in used})
    head = [n["id"] for n in summary["seen"] if n["cpus"] == 1 and n["id"].endswith("00000")]
    launched = used - set(head)
    assert launched, f"every task ran on the head; nodes seen: {summary['seen']}"
    assert used <= {n["id"] for n in summary["seen"]}
    for tid, unit in zip(ids, units, strict=True):
        assert platform.store.get_task(tid)["data"] == unit["expected"]


@pytest.mark.slow
def test_cuda_is_refused_where_no_node_type_has_a_gpu(platform, tmp_path):
    """The same release and `device: cuda` on a cluster whose head and node types have no GPU: the
    run is refused at prepare, naming what to do, before anything is deployed."""
    from totask_ray.embedded.seeds import seed_ocr_demo

    seeded = seed_ocr_demo(platform.store, platform.media_dir, tasks=2, seed=6)
    release, app = gpu_ocr_release(platform.store, "1.0.0-nogpu")
    params = {"name": "No_Gpu", "project": seeded["project"], "method": "inference", "pre_processor": release,
              "pre_processor_params": {"model_config": {"device": "cuda"}}}  # fmt: skip
    with fake_autoscaling_cluster({"cpu": {"CPU": 2}}, max_workers={"cpu": 2}, head_cpus=1) as cluster:
        summary, stderr = _run(platform, tmp_path, cluster, params, settle=None)
    assert summary["error"] is not None, summary
    assert (
        "device: cuda cannot be honoured: this cluster has no GPU and its node types add none"
        in summary["error"]
    )
    assert "--cluster-yaml" in summary["error"]
    assert f"dispatching {app}" not in stderr
    assert all(platform.store.get_task(int(t))["data"] in (None, {}) for t in seeded["truth"])


STATIC_FOUR = textwrap.dedent(
    """
    import json, logging, os, sys
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from totask_ray import run_to_task
    from totask_ray.platform.synapse.client import SynapseConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("totask_ray").setLevel(logging.INFO)
    url, token, project = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=16)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        result = run_to_task({"name": "Four_Nodes", "project": int(project), "target_specification_name": "annotation_data",
                              "batch_size": 5}, platform=SynapseConfig(host=url, access_token=token), progress_bar=False)
        print(json.dumps({"success": result.success_count, "failed": result.failed_count, "ledger": result.ledger}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_a_static_four_node_cluster_is_planned_from_its_64_cpus(platform, tmp_path):
    """Four nodes of 16 logical CPUs: the default pool may grow to what 64 CPUs hold (0.5 CPU per
    actor, a tenth of each node kept for the reads: 31 per node), bounded by the run's batches; no
    constant of 16 stands in the way."""
    units = [good_unit(platform, i, "four") for i in range(200)]
    project, ids = make_project(platform, units)
    proc = subprocess.run(
        [sys.executable, "-c", STATIC_FOUR, platform.url, platform.token, str(project)],
        env=cli_env(platform, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _plan_lines(proc.stderr)
    print("\n".join(lines))
    (pool,) = [line for line in lines if "annotator pool:" in line]
    # 200 tasks in batches of 5 bound the pool at 40; what the cluster holds is stated beside it
    assert "124 fit the cluster once grown" in pool and "growing to at most 40" in pool, pool
    assert "64 CPU" in pool, pool
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # its own driver, log_to_driver=False
    assert (summary["success"], summary["failed"]) == (len(ids), 0)
    for tid, unit in zip(ids, units, strict=True):
        assert platform.store.get_task(tid)["data"] == unit["expected"]
    # annotators on all four nodes recorded every write in the one ledger the driver's node keeps
    from totask_ray.ledger.record import SINK_FILE
    from totask_ray.ledger.store import read_entries

    ledger = Path(summary["ledger"])
    assert sorted(p.name for p in ledger.glob("entries-*.jsonl")) == [SINK_FILE]
    entries = read_entries(ledger)
    assert sorted(entries) == sorted(ids) and all(e.confirmed and e.writes_data for e in entries.values())


JOIN = textwrap.dedent(
    """
    import logging, sys
    import ray
    from totask_ray.cluster import ensure_ray

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = ensure_ray()
    print(started, ray.get_runtime_context().gcs_address.rpartition(":")[2], len(ray.nodes()))
    """
)


@pytest.mark.slow
def test_a_driver_without_an_address_joins_the_cluster_running_here(tmp_path):
    """No `--address` and no RAY_ADDRESS, on a machine where `ray start` runs: the driver joins that
    cluster, and says so, rather than starting a second one beside it. Ray finds the running cluster
    through its address file, `$RAY_TMPDIR/ray/ray_current_cluster`: here this test's own directory,
    linked to the cluster's temp dir, so no other Ray on the machine is in the way."""
    with fake_autoscaling_cluster({"cpu": {"CPU": 1}}, max_workers={"cpu": 1}, head_cpus=1) as cluster:
        (tmp_path / "ray").symlink_to(cluster.temp_dir)
        env = {**cluster.driver_env(os.environ), "RAY_TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    started, port, _nodes = proc.stdout.split()
    assert (started, port) == ("False", cluster.address.rpartition(":")[2]), proc.stdout
    # Ray's address file holds the head's routable address (127.0.0.1 becomes the host's IP)
    port = cluster.address.rpartition(":")[2]
    assert re.search(rf"joining the Ray cluster running on this machine at [\d.]+:{port} ", proc.stderr), (
        proc.stderr[-2000:]
    )
    assert "--address local starts a fresh one" in proc.stderr


@pytest.mark.slow
def test_a_timeout_while_the_node_boots_fails_the_run_but_not_the_scale_up(platform, tmp_path):
    """The readiness wait runs out while the autoscaler is still adding the GPU node (here: a wait
    shorter than any boot). The run fails with that reason and how to remove the app, and the app
    is left deployed: another run may be waiting on the same node, and the replica does come up."""
    from totask_ray.embedded.seeds import seed_ocr_demo

    seeded = seed_ocr_demo(platform.store, platform.media_dir, tasks=2, seed=7)
    release, app = gpu_ocr_release(platform.store, "1.0.0-slowboot")
    params = {
        "name": "Slow_Boot",
        "project": seeded["project"],
        "method": "inference",
        "pre_processor": release,
    }
    with fake_autoscaling_cluster(
        {"cpu": {"CPU": 2}, "gpu": {"CPU": 2, "GPU": 1}}, max_workers={"cpu": 1, "gpu": 1}, idle_timeout_s=3
    ) as cluster:
        summary, stderr = _run(platform, tmp_path, cluster, params,
                               options={"serve_ready_timeout_s": 0.5, "node_boot_timeout_s": 0.5},
                               await_app={"app": app, "timeout_s": 90})  # fmt: skip
    error = summary["error"] or ""
    assert "while the cluster was still adding a node for it" in error, summary
    assert f"{app} is left deployed" in error and f"`totask-ray serve delete {app}`" in error
    assert f"tearing down {app}" not in stderr
    assert summary["app_replicas_later"] == 1, f"the app left deployed never came up: {summary}"
    assert all(platform.store.get_task(int(t))["data"] in (None, {}) for t in seeded["truth"])
