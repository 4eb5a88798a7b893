"""File method, task throughput: the platform's raw capacity, the public SDK, totask-ray.

    python -m bench file [--tasks 10000] [--runs 3] [--latency 0,10] [--sdk-tasks 2000] [--sdk-seq-tasks 1000]

For each platform latency (0 = plain loopback; 20 = the platform waits 20 ms before every answer,
a remote platform without netem), one embedded platform is started and seeded once with `--tasks`
file-method tasks; then, run by run, interleaved, every contender annotates those same tasks
(rewriting the same data again, which the platform accepts):

- raw: a bare aiohttp client doing exactly what a task needs (GET the task with its data unit, GET
  the annotation JSON URL it names, PUT annotate_task_data), at concurrency 16 / 64 / 128;
- sdk bN: the public synapse-sdk `ToTaskAction` (its job entrypoint, a subprocess on its own venv)
  at batch_size 1 and 8 / 32 / 64. It is sequential (or windowed) and its per-task rate does not
  depend on how many tasks it is given, so it runs over the first `--sdk-tasks` tasks
  (`--sdk-seq-tasks` at batch_size 1) of the same project through the `limit` filter;
- totask-ray: `run_to_task` with its defaults on a local Ray started once by this process (a warm
  cluster: Ray Data's actors still start inside each run, as they do for a user).

Every write is read back from the platform's annotation history: its timestamps give each run's
steady-state rate (writes/s between the 10 % and 90 % marks); a run that did not write every task
it was given is reported as failed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from bench import local_platform, local_ray, meters, profiling, public_sdk, tables

RAW_CONCURRENCY = (16, 64, 128)
SDK_BATCHES = (1, 8, 32, 64)
LATENCIES = (0.0, 20.0)


# -- contenders -----------------------------------------------------------------------------------


async def _raw_async(bp: local_platform.BenchPlatform, ids: list[int], concurrency: int) -> int:
    import aiohttp

    base = bp.url
    headers = {**bp.lp.headers, "Content-Type": "application/json"}
    errors = 0
    it = iter(ids)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as s:

        async def worker() -> None:
            nonlocal errors
            for tid in it:
                try:
                    async with s.get(f"{base}/tasks/{tid}/?fields=id,data,data_unit&expand=data_unit") as r:
                        task = json.loads(await r.read())
                        r.raise_for_status()
                    url = task["data_unit"]["files"][local_platform.FILE_TARGET_SPEC]["url"]
                    async with s.get(url) as r:
                        data = json.loads(await r.read())
                        r.raise_for_status()
                    body = json.dumps({"action": "submit", "data": data})
                    async with s.put(f"{base}/tasks/{tid}/annotate_task_data/", data=body) as r:
                        await r.read()
                        r.raise_for_status()
                except Exception:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def run_raw(bp: local_platform.BenchPlatform, concurrency: int) -> dict[str, Any]:
    ids = bp.task_ids
    local_platform.clear_task_data(bp.store, bp.project)
    wm = local_platform.history_watermark(bp.store)
    with meters.CpuMeter({"client": lambda: [__import__("os").getpid()], "server": bp.pid_list}) as cpu:
        t0, e0 = time.perf_counter(), time.time()
        errors = asyncio.run(_raw_async(bp, ids, concurrency))
        secs = time.perf_counter() - t0
    return _finish(bp, wm, len(ids), secs, cpu.shares(), errors=errors, started=e0)


def run_sdk(bp: local_platform.BenchPlatform, sdk_py: Path, batch: int, n: int) -> dict[str, Any]:
    wm = local_platform.history_watermark(bp.store)
    limit = n if n < len(bp.task_ids) else None
    e0 = time.time()
    with meters.CpuMeter({"server": bp.pid_list}) as cpu:
        r = public_sdk.run_sdk_totask(
            sdk_py, bp, public_sdk.sdk_file_params(bp, batch, limit), bp.tmp / "sdk"
        )
    cpu.add("sdk", r.cpu_s)
    ok = r.returncode == 0 and r.result is not None and r.result.get("success_count") == n
    out = _finish(
        bp,
        wm,
        n,
        r.seconds,
        cpu.shares(),
        errors=0 if ok else n - ((r.result or {}).get("success_count") or 0),
        started=e0,
    )
    if not ok:
        out["error"] = f"exit {r.returncode}: {r.stderr_tail[-300:] or r.stdout_tail[-300:]}"
    return out


def run_totask(
    bp: local_platform.BenchPlatform, report: Path, profile_dir: Path | None = None, **options: Any
) -> dict[str, Any]:
    import os

    from totask_ray import run_to_task

    params = {
        "name": "bench_file",
        "project": bp.project,
        "method": "file",
        "target_specification_name": local_platform.FILE_TARGET_SPEC,
        "task_filters": {},
    }
    job = bp.store.create_job("to_task", params, agent_id=bp.agent)
    local_platform.clear_task_data(bp.store, bp.project)
    wm = local_platform.history_watermark(bp.store)
    me = os.getpid()
    groups = {
        "driver": lambda: [me],
        "ray": lambda: meters.descendants(lambda: set(bp.pid_list())),
        "server": bp.pid_list,
    }
    profiler = None
    if profile_dir is not None:
        profiler = _Profiler(bp, profile_dir)
        profiler.start()
    with meters.CpuMeter(groups) as cpu:
        t0, e0 = time.perf_counter(), time.time()
        result = run_to_task(
            params, platform=bp.config(), report=report, job_id=job, progress_bar=False, **options
        )
        secs = time.perf_counter() - t0
    n = len(bp.task_ids)
    out = _finish(bp, wm, n, secs, cpu.shares(), errors=result.failed_count, started=e0)
    if result.success_count != n:
        out["error"] = f"{result.success_count} of {n} succeeded: {result.message}"
    if profiler is not None:
        profiler.join()
        out["profile"] = profiler.text
    return out


class _Profiler(threading.Thread):
    """py-spy on the annotator actors, from the first annotation on the platform for up to 10 s."""

    SECONDS = 10

    def __init__(self, bp: local_platform.BenchPlatform, out_dir: Path):
        super().__init__(name="profiler", daemon=True)
        self.bp, self.out_dir, self.text = bp, out_dir, "(not profiled)"
        self.wm = local_platform.history_watermark(bp.store)

    def run(self) -> None:
        import psutil

        if profiling.py_spy() is None:
            self.text = "(py-spy not found: pip install py-spy)"
            return
        deadline = time.monotonic() + 120
        while (
            local_platform.first_write_after(self.bp.store, self.wm) is None and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        time.sleep(0.5)
        pids = []
        for pid in meters.descendants(lambda: set(self.bp.pid_list())):
            try:
                if "FileAnnotator" in " ".join(psutil.Process(pid).cmdline()):
                    pids.append(pid)
            except psutil.Error:
                continue
        files = profiling.profile_pids(pids, self.SECONDS, self.out_dir)
        self.text = (
            f"py-spy of the {len(pids)} annotator actor(s), {self.SECONDS} s from the first annotation:\n"
            + profiling.profile_summary(files, self.SECONDS)
        )


def _finish(
    bp: local_platform.BenchPlatform,
    wm: int,
    n: int,
    secs: float,
    cpu: dict[str, float],
    errors: int,
    started: float,
) -> dict[str, Any]:
    writes = local_platform.writes_since(bp.store, wm)
    times = [t for _, t in writes]
    ended = started + secs
    out: dict[str, Any] = {
        "tasks": n,
        "seconds": round(secs, 3),
        "tasks_per_s": round(n / secs, 1),
        "steady_per_s": None if (r := local_platform.steady_rate(times)) is None else round(r, 1),
        "writes": len(writes),
        "distinct": len({t for t, _ in writes}),
        "errors": errors,
        "cpu": cpu,
        # where the whole-run rate loses to the steady one: before the first write, after the last
        "to_first_write_s": round(times[0] - started, 2) if times else None,
        "after_last_write_s": round(ended - times[-1], 2) if times else None,
    }
    if out["distinct"] != n or errors:
        out["error"] = f"{out['distinct']} distinct task(s) written of {n}, {errors} error(s)"
    return out


# -- the bench -------------------------------------------------------------------------------------


def bench_latency(
    latency_ms: float,
    tasks: int,
    runs: int,
    sdk_py: Path | None,
    sdk_why: str,
    sdk_tasks: int,
    sdk_seq_tasks: int,
    raw_conc: tuple[int, ...],
    sdk_batches: tuple[int, ...],
    profile_dir: Path | None = None,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:
    with local_platform.platform(latency_ms=latency_ms) as bp:
        seed_s = local_platform.seed_files(bp, tasks)
        tables.log(f"latency {latency_ms:g} ms: seeded {tasks} tasks in {seed_s:.1f} s")
        contenders: list[tuple[str, Any]] = [(f"raw c{k}", (lambda k=k: run_raw(bp, k))) for k in raw_conc]
        for b in sdk_batches:
            n = min(tasks, sdk_seq_tasks if b == 1 else sdk_tasks)
            if sdk_py is not None:
                contenders.append((f"sdk b{b}", (lambda b=b, n=n: run_sdk(bp, sdk_py, b, n))))
        contenders.append(("totask-ray", lambda: run_totask(bp, bp.tmp / "report.jsonl")))
        if only:
            contenders = [(n, f) for n, f in contenders if n.startswith(only)]
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
        load = meters.LoadSampler().start()
        for r in range(runs):
            for name, fn in contenders:
                res = fn()
                results[name].append(res)
                tables.log(
                    f"latency {latency_ms:g} ms run {r + 1}/{runs} {name}: {res['tasks']} tasks in {res['seconds']:.1f} s, "
                    f"{res['tasks_per_s']:.0f}/s (steady {res['steady_per_s']}), cpu {meters.fmt_shares(res['cpu'])}"
                    + (f" ERROR {res['error']}" if "error" in res else "")
                )
        load_summary = load.stop()
        profile = None
        if profile_dir is not None:
            tables.log(f"latency {latency_ms:g} ms: one more totask-ray run under py-spy (not counted above)")
            prof = run_totask(
                bp, bp.tmp / "report-profiled.jsonl", profile_dir=profile_dir / f"latency{latency_ms:g}"
            )
            profile = {k: prof[k] for k in ("tasks_per_s", "steady_per_s", "cpu", "profile")}
        summary = summarize(results)
        return {
            "latency_ms": latency_ms,
            "tasks": tasks,
            "seed_s": round(seed_s, 1),
            "sdk": "" if sdk_py is not None else f"n/a: {sdk_why}",
            "load": load_summary,
            "load_text": load.text(),
            "contenders": summary,
            "runs": results,
            "profile": profile,
        }


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rs in results.items():
        good = [r for r in rs if "error" not in r]
        cpu_keys = sorted({k for r in rs for k in r["cpu"]})
        out[name] = {
            "tasks": rs[0]["tasks"],
            "runs": len(rs),
            "failed_runs": len(rs) - len(good),
            "tasks_per_s": tables.median([r["tasks_per_s"] for r in good]) if good else None,
            "steady_per_s": tables.median([r["steady_per_s"] for r in good if r["steady_per_s"]])
            if good
            else None,
            "all_tasks_per_s": [r["tasks_per_s"] for r in rs],
            "seconds": tables.median([r["seconds"] for r in good]) if good else None,
            "to_first_write_s": tables.median(
                [r["to_first_write_s"] for r in good if r["to_first_write_s"] is not None]
            )
            if good
            else None,
            "after_last_write_s": tables.median(
                [r["after_last_write_s"] for r in good if r["after_last_write_s"] is not None]
            )
            if good
            else None,
            "cpu": {k: tables.median([r["cpu"].get(k, 0.0) for r in good]) for k in cpu_keys} if good else {},
        }
    return out


def best(
    summary: dict[str, dict[str, Any]], prefix: str, key: str = "tasks_per_s"
) -> tuple[str | None, dict[str, Any] | None]:
    cands = [(n, s) for n, s in summary.items() if n.startswith(prefix) and s.get(key)]
    if not cands:
        return None, None
    return max(cands, key=lambda ns: ns[1][key])


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The brief's targets for this latency, on whole-run rates and on steady-state rates."""
    s = res["contenders"]
    ours = s.get("totask-ray", {})
    lines = []
    raw_name, raw = best(s, "raw ")
    sdk1 = s.get("sdk b1")
    sdk_best_name, sdk_best = best({k: v for k, v in s.items() if k != "sdk b1"}, "sdk b")
    goals = (
        [("totask-ray / sdk b1", sdk1, ">=", 3.0), ("totask-ray / raw best", raw, ">=", 0.70)]
        if res["latency_ms"] == 0
        else [("totask-ray / sdk b1", sdk1, ">=", 20.0), ("totask-ray / sdk best batch", sdk_best, ">=", 3.0)]
    )
    for label, other, op, goal in goals:
        for key in ("tasks_per_s", "steady_per_s"):
            val = tables.ratio(ours.get(key), (other or {}).get(key))
            text, met = tables.target_line(
                f"{label} [{'whole run' if key == 'tasks_per_s' else 'steady state'}]", val, op, goal, "x"
            )
            lines.append(
                {"target": label, "basis": key, "value": val, "goal": goal, "met": met, "text": text}
            )
    lines.append({"info": f"best raw: {raw_name}; best SDK batch: {sdk_best_name}"})
    return lines


def print_results(res: dict[str, Any]) -> None:
    s = res["contenders"]
    lat = res["latency_ms"]
    _, raw = best(s, "raw ")
    sdk1 = s.get("sdk b1")
    rows = []
    for name, v in s.items():
        cpu = v["cpu"]
        rows.append(
            [
                name,
                tables.fmt(v["tasks"]),
                tables.fmt(v["seconds"], 1),
                tables.fmt(v["tasks_per_s"]),
                tables.fmt(v["steady_per_s"]),
                tables.fmt(v["to_first_write_s"], 1),
                tables.fmt(v["after_last_write_s"], 1),
                tables.fmt(tables.ratio(v["tasks_per_s"], (raw or {}).get("tasks_per_s")), 2),
                tables.fmt(tables.ratio(v["tasks_per_s"], (sdk1 or {}).get("tasks_per_s")), 1),
                " ".join(f"{k} {x:.2f}" for k, x in cpu.items()),
                f"{v['failed_runs']}/{v['runs']}",
                " ".join(tables.fmt(x) for x in v["all_tasks_per_s"]),
            ]
        )
    title = (
        f"File method, platform latency {lat:g} ms per request ({'plain loopback' if lat == 0 else f'+{lat:g} ms before every answer'}), "
        f"{res['tasks']:,} seeded tasks, medians of {max((v['runs'] for v in s.values()), default=0)} interleaved runs"
    )
    tables.say(
        tables.table(
            [
                "contender",
                "tasks",
                "s",
                "tasks/s",
                "steady/s",
                "to 1st write s",
                "after last write s",
                "vs raw best",
                "vs sdk b1",
                "CPU share (cores)",
                "failed runs",
                "runs tasks/s",
            ],
            rows,
            title,
        )
    )
    if res["sdk"]:
        tables.say(f"SDK contenders: {res['sdk']}")
    tables.say(res["load_text"])
    for t in targets(res):
        tables.say("  " + t.get("text", t.get("info", "")))


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    if args.smoke:  # every contender kind once, on loopback only (latency is just a number)
        tasks, runs = 200, 1
        sdk_tasks, sdk_seq_tasks = 40, 20
        raw_conc, batches = (64,), (1, 8)
        latencies = (0.0,)
    else:
        tasks, runs = args.tasks or 10_000, args.runs
        sdk_tasks, sdk_seq_tasks = args.sdk_tasks or 2000, args.sdk_seq_tasks or 1000
        raw_conc, batches = RAW_CONCURRENCY, SDK_BATCHES
        latencies = tuple(float(x) for x in args.latency.split(",")) if args.latency else LATENCIES
    only = tuple(x.strip() for x in args.only.split(",") if x.strip()) if getattr(args, "only", None) else ()
    sdk_py, why = public_sdk.sdk_python(build=not args.smoke)
    if sdk_py is None:
        tables.say(f"SDK contenders skipped: {why}")
    if not ray_started:
        local_ray.start_ray(args.ray_cpus)
    out = {"machine": meters.machine_info(), "results": []}
    for lat in latencies:
        profile_dir = Path(args.profile) if getattr(args, "profile", None) else None
        res = bench_latency(
            lat, tasks, runs, sdk_py, why, sdk_tasks, sdk_seq_tasks, raw_conc, batches, profile_dir, only
        )
        print_results(res)
        if res.get("profile"):
            p = res["profile"]
            tables.say(
                f"\nProfiled extra totask-ray run (latency {lat:g} ms): {p['tasks_per_s']} tasks/s, steady {p['steady_per_s']}, "
                f"CPU {meters.fmt_shares(p['cpu'])}\n{p['profile']}"
            )
        res["targets"] = targets(res)
        out["results"].append(res)
    tables.dump_json(
        "file",
        {
            **out,
            "results": [{k: v for k, v in r.items() if k not in ("runs", "profile")} for r in out["results"]],
        },
    )
    return out
