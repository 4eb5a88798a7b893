"""Scale-out by simulation (issue 15, item 6): `python -m bench scaleout [--tasks N] [--runs R] [--smoke]`.

The file method on the same seeded tasks of the embedded platform, on two local clusters made with
`ray.cluster_utils.Cluster`, interleaved run by run:
- two nodes x 2 logical CPUs (head + one worker node),
- one node x 4 logical CPUs (the same total).
Each run starts its cluster, connects, runs `run_to_task` (via the file bench's `run_totask`), and
shuts the cluster down; the start is not timed. Where tasks ran comes from the run's report (one
JSONL line per task with the node id of the actor that annotated it).

On one machine the simulated nodes share the same cores: the two-node figure measures what
spreading the work over nodes costs, not added capacity.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import local_platform, local_ray, meters, tables

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# a raylet waits this long for its dashboard agent; on this loaded 2-core box 18 s were not always enough
os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")

LAYOUTS: dict[str, tuple[int, ...]] = {"two-node 2x2": (2, 2), "one-node 1x4": (4,)}


def _node_args(cpus: int, head: bool) -> dict[str, Any]:
    args: dict[str, Any] = {"num_cpus": cpus, "node_ip_address": "127.0.0.1"}
    if head:
        args.update(include_dashboard=False, dashboard_host="127.0.0.1")
    return args


def start_cluster(layout: tuple[int, ...], tries: int = 3) -> Any:
    """A local cluster of `layout` nodes (logical CPUs each), the driver connected to it.

    Ray gives a raylet 30 s to register (not configurable); on this shared 2-core box under load
    that is sometimes not enough, so a failed start is tried again."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray turns a 127.0.0.1 address into this host's outward IP before connecting, unless it runs
    # "without clusters" (as on macOS): with that off, the driver reaches the loopback-bound GCS.
    ray_constants.ENABLE_RAY_CLUSTER = False
    for attempt in range(tries):
        try:
            cluster = Cluster(initialize_head=True, head_node_args=_node_args(layout[0], head=True))
            break
        except Exception as exc:
            if attempt == tries - 1:
                raise
            tables.log(f"scaleout: cluster start failed ({exc}); trying again")
    for cpus in layout[1:]:
        cluster.add_node(**_node_args(cpus, head=False))
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    )
    return cluster


def stop_cluster(cluster: Any) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def nodes_of(report: Path, names: dict[str, str]) -> dict[str, int]:
    """Tasks per node in a run report (node ids named head / worker N where known)."""
    counts: Counter[str] = Counter()
    with report.open() as fh:
        for line in fh:
            line = line.strip()
            if line:
                node = json.loads(line).get("node") or "?"
                counts[names.get(node, node[:8])] += 1
    return dict(sorted(counts.items()))


def run_layout(
    bp: local_platform.BenchPlatform, name: str, layout: tuple[int, ...], k: int
) -> dict[str, Any]:
    from bench import file_method as fm

    t0 = time.perf_counter()
    cluster = start_cluster(layout)
    start_s = time.perf_counter() - t0
    try:
        names = {cluster.head_node.node_id: "head"}
        names.update({n.node_id: f"worker{i + 1}" for i, n in enumerate(cluster.worker_nodes)})
        report = bp.tmp / f"report-{name.split()[0]}-{k}.jsonl"
        res = fm.run_totask(bp, report)
    finally:
        stop_cluster(cluster)
    res["cluster_start_s"] = round(start_s, 1)
    res["per_node"] = nodes_of(report, names) if report.exists() else {}
    res["nodes_used"] = len(res["per_node"])
    return res


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rs in results.items():
        good = [r for r in rs if "error" not in r]
        per_node: dict[str, float] = {}
        for node in sorted({n for r in good for n in r["per_node"]}):
            per_node[node] = tables.median([r["per_node"].get(node, 0) for r in good])
        out[name] = {
            "layout": LAYOUTS[name],
            "tasks": rs[0]["tasks"],
            "runs": len(rs),
            "failed_runs": len(rs) - len(good),
            "tasks_per_s": tables.median([r["tasks_per_s"] for r in good]) if good else None,
            "steady_per_s": tables.median([r["steady_per_s"] for r in good if r["steady_per_s"]])
            if good
            else None,
            "seconds": tables.median([r["seconds"] for r in good]) if good else None,
            "to_first_write_s": tables.median(
                [r["to_first_write_s"] for r in good if r["to_first_write_s"] is not None]
            )
            if good
            else None,
            "nodes_used": tables.median([r["nodes_used"] for r in good]) if good else None,
            "per_node_tasks": per_node,
            "all_tasks_per_s": [r["tasks_per_s"] for r in rs],
            "cluster_start_s": tables.median([r["cluster_start_s"] for r in rs]),
            "errors": [r["error"] for r in rs if "error" in r],
        }
    return out


def print_results(summary: dict[str, dict[str, Any]], tasks: int, runs: int, load_text: str) -> float | None:
    rows = []
    for name, v in summary.items():
        rows.append(
            [
                name,
                tables.fmt(v["tasks"]),
                tables.fmt(v["seconds"], 1),
                tables.fmt(v["tasks_per_s"]),
                tables.fmt(v["steady_per_s"]),
                tables.fmt(v["to_first_write_s"], 1),
                tables.fmt(v["nodes_used"]),
                " ".join(f"{n} {tables.fmt(x)}" for n, x in v["per_node_tasks"].items()) or "n/a",
                tables.fmt(v["cluster_start_s"], 1),
                f"{v['failed_runs']}/{v['runs']}",
                " ".join(tables.fmt(x) for x in v["all_tasks_per_s"]),
            ]
        )
    tables.say(
        tables.table(
            [
                "cluster",
                "tasks",
                "s",
                "tasks/s",
                "steady/s",
                "to 1st write s",
                "nodes used",
                "tasks per node (median)",
                "cluster start s (not timed)",
                "failed runs",
                "runs tasks/s",
            ],
            rows,
            f"Scale-out by simulation: file method, {tasks:,} seeded tasks, loopback, medians of {runs} interleaved runs "
            f"(simulated nodes share this machine's {os.cpu_count()} cores)",
        )
    )
    for name, v in summary.items():
        for e in v["errors"]:
            tables.say(f"  {name}: ERROR {e}")
    two, one = summary.get("two-node 2x2", {}), summary.get("one-node 1x4", {})
    r = tables.ratio(two.get("tasks_per_s"), one.get("tasks_per_s"))
    rs = tables.ratio(two.get("steady_per_s"), one.get("steady_per_s"))
    tables.say(f"two-node / one-node: {tables.fmt(r, 2)}x whole run, {tables.fmt(rs, 2)}x steady")
    tables.say(load_text)
    return r


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    import ray

    if args.smoke:
        tasks, runs = args.tasks or 200, 1
    else:
        tasks, runs = args.tasks or 3000, args.runs
    if ray_started or ray.is_initialized():
        ray.shutdown()  # this bench needs clusters of its own
    machine = meters.machine_info()
    try:
        with local_platform.platform() as bp:
            seed_s = local_platform.seed_files(bp, tasks)
            tables.log(f"scaleout: seeded {tasks} tasks in {seed_s:.1f} s")
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in LAYOUTS}
            load = meters.LoadSampler().start()
            for k in range(runs):
                for name, layout in LAYOUTS.items():
                    res = run_layout(bp, name, layout, k)
                    results[name].append(res)
                    tables.log(
                        f"scaleout run {k + 1}/{runs} {name}: {res['tasks']} tasks in {res['seconds']:.1f} s, "
                        f"{res['tasks_per_s']:.0f}/s (steady {res['steady_per_s']}), nodes {res['per_node']}, "
                        f"cluster start {res['cluster_start_s']} s"
                        + (f" ERROR {res['error']}" if "error" in res else "")
                    )
            load_summary = load.stop()
            summary = summarize(results)
            ratio = print_results(summary, tasks, runs, load.text())
    finally:
        if ray_started:
            local_ray.start_ray(getattr(args, "ray_cpus", None))
    out = {
        "machine": machine,
        "tasks": tasks,
        "seed_s": round(seed_s, 1),
        "load": load_summary,
        "contenders": summary,
        "two_over_one": None if ratio is None else round(ratio, 3),
    }
    tables.dump_json("scaleout", out)
    return out
