"""The run ledger's cost: file-method throughput with and without it, and its bytes per task.

Both contenders are the same `run_to_task` on the same seeded project of the embedded platform,
interleaved (with, without, with, ...) `--runs` times each; every run writes every task (the bench
clears the task data first). The ledger's bytes per task are its entry files over the tasks of a
run (the seeded demo's objects: what the run wrote and the task's empty "before"), and the undo of
one run is timed too (16 threads over the blocking client).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench import file_method, local_platform, tables


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    from totask_ray.ledger.store import ledger_bytes, one_run
    from totask_ray.ledger.undo import undo_run

    tasks = 300 if args.smoke else (args.tasks or 5000)
    runs = 1 if args.smoke else args.runs
    res: dict[str, list[dict[str, Any]]] = {"with ledger": [], "without": []}
    bytes_per_task = None
    undo_s = None
    with tempfile.TemporaryDirectory(prefix="totask-bench-ledger-") as tmp, local_platform.platform() as bp:
        local_platform.seed_files(bp, tasks)
        warm = file_method.run_totask(bp, Path(tmp) / "warm-up.jsonl", no_ledger=True)  # actors, imports
        tables.log(f"warm-up run (not counted): {warm['tasks_per_s']} tasks/s")
        for i in range(runs):
            for name in res:
                report = Path(tmp) / f"{name.replace(' ', '_')}-{i}.jsonl"
                out = file_method.run_totask(bp, report, no_ledger=name == "without")
                res[name].append(out)
                tables.log(f"{name} run {i + 1}: {out['tasks_per_s']} tasks/s {out.get('error', '')}")
                if name == "with ledger" and bytes_per_task is None:
                    run_dir = one_run(Path(str(report) + ".ledger"))
                    bytes_per_task = ledger_bytes(run_dir) / tasks
                    t0 = time.perf_counter()
                    undone = undo_run(run_dir, bp.config())
                    undo_s = time.perf_counter() - t0
                    tables.log(f"undo of {undone.restored} tasks: {undo_s:.1f} s")
    cpu_us = _cpu_per_task_us()
    rows = []
    med = {n: tables.median([r["tasks_per_s"] for r in rs]) for n, rs in res.items()}
    for name, rs in res.items():
        rows.append([name, len(rs), tables.fmt(med[name], 1), " / ".join(str(r["tasks_per_s"]) for r in rs)])
    tables.say(
        tables.table(
            ["contender", "runs", "median tasks/s", "each run"], rows, title=f"ledger, {tasks} tasks"
        )
    )
    cost = 1 - med["with ledger"] / med["without"] if med["without"] else None
    tables.say(
        f"ledger cost: {cost:.1%} of throughput; {bytes_per_task:.0f} bytes per task; "
        f"undo of {tasks} tasks {undo_s:.1f} s ({tasks / undo_s:.0f} tasks/s); "
        f"the ledger's own CPU per written task {cpu_us:.0f} us (its two lines, one task of the demo)"
    )
    return {"median": med, "cost": cost, "bytes_per_task": bytes_per_task, "undo_s": undo_s, "cpu_us": cpu_us}


def _cpu_per_task_us(n: int = 20000) -> float:
    """What the ledger adds to one written task in the actor, alone: the `b` line (digest and
    JSON of the before and the written data) and the `w` line, each one `os.write`."""
    import random

    from totask_ray.embedded.seeds.files import CLASS_IDS, make_annotation
    from totask_ray.ledger.record import LedgerSpec, LedgerWriter

    data = make_annotation(random.Random(0), 512, 512, tuple(CLASS_IDS))
    with tempfile.TemporaryDirectory() as tmp:
        w = LedgerWriter(LedgerSpec(run_id="bench", path=tmp))
        t0 = time.process_time()
        for i in range(n):
            w.before(i, {}, data)
            w.written(i)
        spent = time.process_time() - t0
        w.close()
    return spent / n * 1e6
