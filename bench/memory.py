"""The driver's memory over a file-method run: peak RSS at 10,000 and 200,000 tasks.

    python -m bench memory [--sizes 10000,200000] [--runs 3]

One embedded platform holds one seeded project per size. Each run starts a separate driver
process (`python -m bench.memory --child`, only the driver: it connects to the warm local Ray this
bench started, as `totask-ray run --address` does) that runs `run_to_task` with its defaults and a
`--report` file, and samples its own RSS every 50 ms; `VmHWM` (/proc/self/status) gives its peak as
the kernel saw it. Sizes are interleaved run by run. Only the driver is measured: Ray's workers and the platform
are other processes.

The target is on the growth between sizes: peak(200k) - peak(10k) <= 50 MB.

`--data-context KEY=VALUE` (repeatable) sets a Ray `DataContext` field in the measured driver before
the run. It is a diagnostic, not a tuning knob of the product: e.g. `target_max_block_size=65536`
shows what the run does once Ray Data stops coalescing the pipeline's tiny blocks (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARK = "__BENCH_MEMORY__"


# -- the measured driver (a child process) ---------------------------------------------------------


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child(argv: list[str]) -> int:
    import argparse
    import threading

    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--project", type=int, required=True)
    ap.add_argument("--job", type=int, default=None)
    ap.add_argument("--report", required=True)
    ap.add_argument("--data-context", action="append", default=[])
    a = ap.parse_args(argv)

    import psutil

    me = psutil.Process()
    t0 = time.perf_counter()
    from totask_ray import run_to_task
    from totask_ray.cluster import ensure_ray
    from totask_ray.platform.synapse.client import SynapseConfig

    ensure_ray(a.address)
    import ray.data  # the pipeline imports it; count it in the baseline, not the growth

    dc = ray.data.DataContext.get_current()
    for item in a.data_context:  # diagnostics only: see --data-context
        key, _, value = item.partition("=")
        setattr(dc, key, type(getattr(dc, key))(value))

    baseline = me.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], me.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    setup_s = time.perf_counter() - t0
    params = {"name": "bench_memory", "project": a.project, "method": "file",
              "target_specification_name": "annotation_data", "task_filters": {}}  # fmt: skip
    t1 = time.perf_counter()
    try:
        result = run_to_task(
            params, platform=SynapseConfig.from_env(), report=Path(a.report), job_id=a.job, progress_bar=False
        )
    except Exception as exc:  # report the run's own message and what caused it (e.g. Ray Data's)
        stop.set()
        cause = exc.__cause__
        failure = {
            "error": f"{type(exc).__name__}: {exc}",
            "cause": "" if cause is None else f"{type(cause).__name__}: {cause}"[:3000],
            "after_s": round(time.perf_counter() - t1, 1),
            "peak_sampled_mb": round(peak[0] / 2**20, 1),
        }
        sys.stdout.write(MARK + json.dumps(failure) + "\n")
        sys.stdout.flush()
        return 1
    secs = time.perf_counter() - t1
    stop.set()
    end = me.memory_info().rss
    peak[0] = max(peak[0], end)
    mb = 1024 * 1024
    out = {
        "setup_s": round(setup_s, 2),
        "seconds": round(secs, 2),
        "success": result.success_count,
        "failed": result.failed_count,
        "baseline_mb": round(baseline / mb, 1),
        "peak_sampled_mb": round(peak[0] / mb, 1),
        # VmHWM: this process image's own high-water mark. (getrusage's ru_maxrss is not usable
        # here: Linux carries the pre-exec high-water mark of the forked parent over exec.)
        "peak_hwm_mb": round(_vm_hwm_kb() / 1024, 1),
        "end_mb": round(end / mb, 1),
    }
    sys.stdout.write(MARK + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


# -- the bench ------------------------------------------------------------------------------------


def run_child(
    bp: Any, project: int, n: int, address: str, report: Path, data_context: list[str] | None = None
) -> dict[str, Any]:
    import psutil

    from bench import environment

    job = bp.store.create_job("to_task", {"project": project}, agent_id=bp.agent)
    env = environment.env_for_children()
    env["SYNAPSE_HOST"] = bp.url
    env["SYNAPSE_ACCESS_TOKEN"] = bp.token
    cmd = [sys.executable, "-m", "bench.memory", "--child", "--address", address, "--project", str(project),
           "--job", str(job), "--report", str(report)]  # fmt: skip
    for item in data_context or []:
        cmd += ["--data-context", item]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=environment.ROOT
    )
    outside_peak = 0
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            outside_peak = max(outside_peak, p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    res: dict[str, Any] = {"tasks": n, "wall_s": round(wall, 1)}
    (report.parent / f"driver-{n}-{job}.err").write_text(err)
    line = next((ln for ln in out.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        failure = json.loads(line[len(MARK) :]) if line else {}
        res["error"] = f"driver exit {proc.returncode}: " + (
            f"{failure.get('error')} after {failure.get('after_s')} s; cause: {failure.get('cause')}"
            if failure
            else err[-800:]
        )
        return res
    res.update(json.loads(line[len(MARK) :]))
    res["peak_outside_mb"] = round(outside_peak / 2**20, 1)
    res["peak_mb"] = max(res["peak_sampled_mb"], res["peak_hwm_mb"])
    res["growth_mb"] = round(res["peak_mb"] - res["baseline_mb"], 1)
    res["tasks_per_s"] = round(n / res["seconds"], 1)
    if res["success"] != n:
        res["error"] = f"{res['success']} of {n} succeeded"
    return res


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    from bench import local_platform, local_ray, meters, tables

    if args.smoke:
        sizes, runs = [300], 1  # one driver: the code path, not the growth
    else:
        sizes = [int(s) for s in (args.sizes or "10000,200000").split(",")]
        runs = args.runs
    if not ray_started:
        local_ray.start_ray(args.ray_cpus)
    address = local_ray.ray_address()
    with local_platform.platform() as bp:
        projects = {}
        for n in sizes:
            seed_s = local_platform.seed_files(bp, n)
            projects[n] = bp.project
            tables.log(f"memory: seeded {n:,} tasks in {seed_s:.1f} s")
        results: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
        load = meters.LoadSampler().start()
        for r in range(runs):
            for n in sizes:
                res = run_child(bp, projects[n], n, address, bp.tmp / f"report-{n}.jsonl", args.data_context)
                results[n].append(res)
                tables.log(f"memory run {r + 1}/{runs} {n:,} tasks: " + json.dumps(res))
        load.stop()

    summary = {}
    rows = []
    for n in sizes:
        good = [x for x in results[n] if "error" not in x]
        s = {k: tables.median([x[k] for x in good]) if good else None
             for k in ("baseline_mb", "peak_mb", "peak_outside_mb", "growth_mb", "end_mb", "tasks_per_s", "seconds", "setup_s")}  # fmt: skip
        s["failed_runs"] = len(results[n]) - len(good)
        s["runs_peak_mb"] = [x.get("peak_mb") for x in results[n]]
        summary[n] = s
        rows.append([f"{n:,}", tables.fmt(s["tasks_per_s"]), tables.fmt(s["baseline_mb"], 1), tables.fmt(s["peak_mb"], 1),
                     tables.fmt(s["peak_outside_mb"], 1), tables.fmt(s["growth_mb"], 1), tables.fmt(s["end_mb"], 1),
                     f"{s['failed_runs']}/{len(results[n])}", " ".join(tables.fmt(x, 1) for x in s["runs_peak_mb"])])  # fmt: skip
    tables.say(tables.table(
        ["tasks", "tasks/s", "RSS after imports + ray.init MB", "peak RSS MB", "peak seen from outside MB",
         "growth in run MB", "RSS at end MB", "failed runs", "runs peak MB"],
        rows,
        f"Driver memory, file method (run_to_task defaults, --report on), medians of {runs} interleaved runs",
    ))  # fmt: skip
    tables.say(load.text())
    lo, hi = summary[sizes[0]], summary[sizes[-1]]
    diff = None if lo["peak_mb"] is None or hi["peak_mb"] is None else hi["peak_mb"] - lo["peak_mb"]
    text, met = tables.target_line(
        f"peak RSS growth {sizes[0]:,} -> {sizes[-1]:,} tasks", diff, "<=", 50.0, " MB"
    )
    tables.say("  " + text)
    gdiff = None if lo["growth_mb"] is None or hi["growth_mb"] is None else hi["growth_mb"] - lo["growth_mb"]
    tables.say(f"  (in-run growth difference: {tables.fmt(gdiff, 1)} MB)")
    out = {"sizes": sizes, "summary": summary, "target": {"value": diff, "met": met, "text": text},
           "load": load.summary(), "runs": results}  # fmt: skip
    tables.dump_json("memory", out)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        sys.exit(child(sys.argv[2:]))
    print("run it as `python -m bench memory`", file=sys.stderr)
    sys.exit(2)
