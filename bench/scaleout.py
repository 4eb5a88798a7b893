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

Then the autoscaling case: the OCR demo's inference run on Ray's fake multi-node autoscaler
(`devtools.fake_cluster`: a head of 0 CPUs, node types `cpu` {CPU 2} and `gpu` {CPU 2, GPU 1}, each
from 0 to 1 node, idle timeout 3 s), the release needing one GPU per replica and `device: cuda`.
A fresh cluster per run, the run its own driver process (`python -m devtools.sized_run SPEC`,
one Ray connection per process). Measured from the run's start (just before `run_to_task`): the
GPU node alive in `ray.nodes()`, the first write on the platform, the run's end; then the node
count right after the run and the seconds from the run's end until the Serve replicas are at 0
and the cluster is back to the head alone (Serve's `scale_down_delay_s=2`, the autoscaler's idle
timeout; and before that, Serve's 30 s minimum draining of the node's HTTP proxy, measured: 27.6 s
instead of 53.7 s with RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S=5). Nodes are extra raylets on this
machine: their boot time is not a cloud VM's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import environment, local_platform, local_ray, meters, tables

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


# -- the autoscaling case --------------------------------------------------------------------------

AUTO_TYPES = {"cpu": {"CPU": 2}, "gpu": {"CPU": 2, "GPU": 1}}
AUTO_MAX = {"cpu": 1, "gpu": 1}
AUTO_IDLE_S = 3.0
AUTO_OPTIONS = {"scale_down_delay_s": 2, "actor_cpus": 0.5}
AUTO_VERSION = "1.0.0-bench-autoscale"
AUTO_TASKS, AUTO_TASKS_SMOKE = 24, 4


def seed_gpu_ocr(bp: local_platform.BenchPlatform, tasks: int) -> dict[str, Any]:
    """The OCR demo and its release made to need one whole GPU per replica, planned (no
    num_replicas), without its memory reservation (the fake provider gives no `memory` resource)."""
    from devtools.sized_run import gpu_ocr_release
    from totask_ray.embedded.seeds import seed_ocr_demo

    seeded = seed_ocr_demo(bp.store, bp.lp.media_dir, tasks=tasks, seed=7)
    release, app = gpu_ocr_release(bp.store, AUTO_VERSION)
    params = {"name": "bench_autoscale", "project": seeded["project"], "method": "inference",
              "pre_processor": release, "batch_size": 2,
              "pre_processor_params": {**seeded["pre_processor_params"], "model_config": {"device": "cuda"}}}  # fmt: skip
    return {"project": seeded["project"], "tasks": tasks, "params": params, "app": app}


def run_autoscaling(
    bp: local_platform.BenchPlatform, job: dict[str, Any], k: int, settle: bool = True
) -> dict[str, Any]:
    """One run on a fresh fake autoscaling cluster, driven by a child process; its summary plus the
    first write on the platform (the platform's own timestamps against the driver's start)."""
    from devtools.fake_cluster import fake_autoscaling_cluster
    from devtools.sized_run import read_summary

    local_platform.clear_task_data(bp.store, job["project"])
    wm = local_platform.history_watermark(bp.store)
    spec_path = bp.tmp / f"autoscale-{k}.json"
    t0 = time.perf_counter()
    with fake_autoscaling_cluster(AUTO_TYPES, max_workers=AUTO_MAX, idle_timeout_s=AUTO_IDLE_S) as cluster:
        start_s = time.perf_counter() - t0
        spec = {"address": cluster.address, "url": bp.url, "token": bp.token, "params": job["params"],
                "options": AUTO_OPTIONS}  # fmt: skip
        if settle:  # the smoke leaves it out (~50 s): tests/test_cluster_sizing.py checks the settling
            spec["settle"] = {"app": job["app"], "nodes": 1, "timeout_s": 150}
        spec_path.write_text(json.dumps(spec))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "devtools.sized_run", str(spec_path)],
                cwd=environment.ROOT, env=cluster.driver_env(environment.env_for_children()),
                capture_output=True, text=True, timeout=450,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            return {"tasks": job["tasks"], "error": f"the driver ran past {exc.timeout:g} s"}
    res = read_summary(spec_path)
    if res is None:
        return {
            "tasks": job["tasks"],
            "error": f"driver exit {proc.returncode}",
            "driver_log_tail": proc.stderr[-2000:],
        }
    res["tasks"] = job["tasks"]
    res["nodes_seen"] = len(res.pop("seen", []))
    res["cluster_start_s"] = round(start_s, 1)
    first = local_platform.first_write_after(bp.store, wm)
    res["to_first_write_s"] = None if first is None else round(first - res.pop("started_epoch"), 1)
    res["written"] = len({t for t, _ in local_platform.writes_since(bp.store, wm)})
    if res.get("error") is None and (res["success"], res["failed"]) != (job["tasks"], 0):
        res["error"] = f"{res['success']} of {job['tasks']} succeeded, {res['failed']} failed"
    if res.get("error") is None:
        res.pop("error", None)
    else:
        res["driver_log_tail"] = proc.stderr[-2000:]
    if settle and res.get("back_s") is None and "error" not in res:
        res["error"] = f"not back to the head alone after the run: {res['nodes_settled']} nodes"
    return res


AUTO_FIELDS = ("first_gpu_node_s", "to_first_write_s", "run_s", "nodes_after_run", "back_s")


def summarize_autoscaling(rs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in rs if "error" not in r]
    out: dict[str, Any] = {"tasks": rs[0]["tasks"], "runs": len(rs), "failed_runs": len(rs) - len(good)}
    for f in (*AUTO_FIELDS, "replicas_zero_s", "success", "failed", "nodes_seen", "cluster_start_s"):
        vals = [r[f] for r in good if r.get(f) is not None]  # medians of the runs that succeeded
        out[f] = tables.median(vals) if vals else None
    out["each_run"] = rs
    out["errors"] = [r["error"] for r in rs if "error" in r]
    return out


def print_autoscaling(v: dict[str, Any]) -> None:
    def each(f: str) -> str:
        return " ".join(tables.fmt(r.get(f), 1) for r in v["each_run"])

    rows = [
        ["GPU node up (from run start) s", tables.fmt(v["first_gpu_node_s"], 1), each("first_gpu_node_s")],
        ["first write (from run start) s", tables.fmt(v["to_first_write_s"], 1), each("to_first_write_s")],
        ["whole run s", tables.fmt(v["run_s"], 1), each("run_s")],
        ["tasks succeeded", tables.fmt(v["success"]), each("success")],
        ["tasks failed", tables.fmt(v["failed"]), each("failed")],
        ["nodes seen during the run", tables.fmt(v["nodes_seen"]), each("nodes_seen")],
        ["nodes right after the run", tables.fmt(v["nodes_after_run"]), each("nodes_after_run")],
        ["replicas at 0 (from run end) s", tables.fmt(v["replicas_zero_s"], 1), each("replicas_zero_s")],
        ["back to head only (from run end) s", tables.fmt(v["back_s"], 1), each("back_s")],
        ["cluster start s (not timed)", tables.fmt(v["cluster_start_s"], 1), each("cluster_start_s")],
    ]
    tables.say(
        tables.table(
            ["autoscaling, GPU pool from zero", "median", "each run"],
            rows,
            f"Autoscaling by simulation: OCR inference, {v['tasks']} tasks, 1 GPU per replica, on Ray's fake "
            f"autoscaler (head 0 CPUs; node types cpu 2 CPUs, gpu 2 CPUs + 1 logical GPU, 0..1 each; idle "
            f"timeout {AUTO_IDLE_S:g} s; scale_down_delay_s {AUTO_OPTIONS['scale_down_delay_s']}), medians of "
            f"{v['runs']} runs, {v['failed_runs']} failed. Nodes are simulated raylets on this machine "
            f"({os.cpu_count()} cores): a node boots in seconds, not a cloud VM's minutes",
        )
    )
    tables.say(
        "the GPU node goes some 30 s after the replicas reach 0: Serve drains the HTTP proxy of a node left "
        "without replicas for at least RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S (30 s), and only then is the node "
        f"idle for the autoscaler ({AUTO_IDLE_S:g} s)"
    )
    for e in v["errors"]:
        tables.say(f"  autoscaling: ERROR {e}")


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    import ray

    if args.smoke:
        tasks, runs, auto_tasks = args.tasks or 200, 1, AUTO_TASKS_SMOKE
    else:
        tasks, runs, auto_tasks = args.tasks or 3000, args.runs, AUTO_TASKS
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
            job = seed_gpu_ocr(bp, auto_tasks)
            auto_runs = []
            for k in range(runs):
                res = run_autoscaling(bp, job, k, settle=not args.smoke)
                auto_runs.append(res)
                tables.log(
                    f"scaleout autoscaling run {k + 1}/{runs}: GPU node up {res.get('first_gpu_node_s')} s, "
                    f"first write {res.get('to_first_write_s')} s, run {res.get('run_s')} s, "
                    f"{res.get('success')} ok / {res.get('failed')} failed, {res.get('nodes_after_run')} nodes "
                    f"after, head alone {res.get('back_s')} s later"
                    + (f" ERROR {res['error']}" if "error" in res else "")
                )
            autoscaling = summarize_autoscaling(auto_runs)
            print_autoscaling(autoscaling)
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
        "autoscaling": autoscaling,
    }
    tables.dump_json("scaleout", out)
    return out
