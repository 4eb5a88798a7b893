"""Client CPU per task, file method: the annotator's own code against a bare aiohttp client.

    python -m bench client-cpu [--tasks 3000] [--runs 3] [--profile DIR]

Both contenders run in this process, one after the other, on one event loop, against the same
embedded platform (its server is another process, so this process's CPU time is the client's
alone): the bare client does exactly a task's three requests (GET the task with its data unit,
GET the JSON, PUT it back); totask-ray runs `FileAnnotator.run_batch` (what each Ray Data actor
runs on a block: the model of the task, the URL policy, the download's checks, validation, the
write, the outcome), without Ray around it. CPU per task = `time.process_time()` / tasks; the
target (issue 15) is <= 1.5 ms and <= 2x the bare client in the same run. Every run's writes are
read back from the platform's history.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import local_platform, meters, tables
from bench.file_method import _finish as finish_run
from bench.file_method import _raw_async as bare_client  # the file bench's raw contender

CONCURRENCY = 32  # the annotator's default (`concurrency`); the bare client gets the same


def _annotator(bp: local_platform.BenchPlatform) -> Any:
    from totask_ray.methods.file import FileAnnotator
    from totask_ray.params import ToTaskParams
    from totask_ray.pipeline.spec import RunOptions, RunSpec

    params = ToTaskParams.model_validate(
        {
            "name": "bench_client_cpu",
            "project": bp.project,
            "method": "file",
            "target_specification_name": local_platform.FILE_TARGET_SPEC,
            "task_filters": {},
        }
    )
    return FileAnnotator(
        RunSpec(params=params, options=RunOptions(concurrency=CONCURRENCY), platform=bp.config())
    )


async def _ours(bp: local_platform.BenchPlatform, ids: list[int], block: int) -> int:
    annotator = _annotator(bp)
    await annotator._ready()
    failed = 0
    # blocks as Ray Data hands them (the pipeline's batch_size), two in flight as in the pool
    chunks = [ids[i : i + block] for i in range(0, len(ids), block)]
    sem = asyncio.Semaphore(2)

    async def one(chunk: list[int]) -> None:
        nonlocal failed
        async with sem:
            outcomes = await annotator.run_batch(chunk)
        failed += sum(1 for o in outcomes if not o.written)

    await asyncio.gather(*(one(ch) for ch in chunks))
    await annotator._client.aclose()
    await annotator._downloader.aclose()
    return failed


def _measure(bp: local_platform.BenchPlatform, name: str, ids: list[int], block: int) -> dict[str, Any]:
    local_platform.clear_task_data(bp.store, bp.project)
    wm = local_platform.history_watermark(bp.store)
    cpu0, t0, e0 = time.process_time(), time.perf_counter(), time.time()
    errors = asyncio.run(bare_client(bp, ids, CONCURRENCY) if name == "bare" else _ours(bp, ids, block))
    cpu, secs = time.process_time() - cpu0, time.perf_counter() - t0
    # the file bench's read-back: every task written once, or the run is marked failed
    out = finish_run(bp, wm, len(ids), secs, {"client": cpu / secs}, errors=errors, started=e0)
    out["cpu_ms_per_task"] = round(cpu * 1000 / len(ids), 3)
    return out


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    tasks, runs = (200, 1) if args.smoke else (args.tasks or 3000, args.runs)
    block = 100
    with local_platform.platform() as bp:
        local_platform.seed_files(bp, tasks)
        ids = bp.task_ids
        for name in ("bare", "totask-ray"):  # warm-up (not counted): imports, pydantic's models
            _measure(bp, name, ids[:300], block)
        results: dict[str, list[dict[str, Any]]] = {"bare": [], "totask-ray": []}
        for r in range(runs):
            for name in results:
                res = _measure(bp, name, ids, block)
                results[name].append(res)
                tables.log(
                    f"run {r + 1}/{runs} {name}: {res['cpu_ms_per_task']:.3f} ms CPU/task, "
                    f"{res['tasks_per_s']:.0f} tasks/s" + (f" ERROR {res['error']}" if "error" in res else "")
                )
        profile = None
        if getattr(args, "profile", None):
            profile = _profile(bp, ids, block, args.profile)
    summary = {
        name: {
            "cpu_ms_per_task": tables.median([x["cpu_ms_per_task"] for x in rs]),
            "tasks_per_s": tables.median([x["tasks_per_s"] for x in rs]),
            "runs_cpu_ms": [x["cpu_ms_per_task"] for x in rs],
            "failed_runs": sum(1 for x in rs if "error" in x),
        }
        for name, rs in results.items()
    }
    ours, bare = summary["totask-ray"]["cpu_ms_per_task"], summary["bare"]["cpu_ms_per_task"]
    ratio = tables.ratio(ours, bare)
    rows = [
        [
            n,
            tables.fmt(tasks),
            tables.fmt(s["cpu_ms_per_task"], 3),
            tables.fmt(s["tasks_per_s"]),
            tables.fmt(tables.ratio(s["cpu_ms_per_task"], bare), 2),
            f"{s['failed_runs']}/{runs}",
            " ".join(f"{x:.3f}" for x in s["runs_cpu_ms"]),
        ]
        for n, s in summary.items()
    ]
    tables.say(
        tables.table(
            ["contender", "tasks", "CPU ms/task", "tasks/s", "vs bare", "failed runs", "runs ms"],
            rows,
            f"Client CPU per task, file method, loopback, concurrency {CONCURRENCY}, medians of {runs}",
        )
    )
    lines = [
        tables.target_line("totask-ray CPU per task", ours, "<=", 1.5, " ms")[0],
        tables.target_line("totask-ray / bare CPU per task", ratio, "<=", 2.0, "x")[0],
    ]
    for line in lines:
        tables.say("  " + line)
    if profile:
        tables.say(profile)
    out = {"machine": meters.machine_info(), "summary": summary, "runs": results, "targets": lines}
    tables.dump_json("client_cpu", out)
    return out


def _profile(bp: local_platform.BenchPlatform, ids: list[int], block: int, out_dir: str) -> str:
    """One more totask-ray run under cProfile (not counted): where the client's CPU goes."""
    import cProfile
    import io
    import pstats
    from pathlib import Path

    local_platform.clear_task_data(bp.store, bp.project)
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(_ours(bp, ids, block))
    prof.disable()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(Path(out_dir) / "client_cpu.prof"))
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    return buf.getvalue()
