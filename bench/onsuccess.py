"""`on_success` with a status filter: does the work still spread over every actor, and how soon
does the first write land? (issue 25)

    python -m bench onsuccess [--tasks 20000] [--runs 3]

One embedded platform is seeded once with `--tasks` file-method tasks; then, interleaved, `--runs`
times each, two contenders run `run_to_task` with `num_actors=4` over the same tasks, both with
the filter `status__in: [pending]`:

- on_success: the job also moves each written task `pending` -> `in_progress` (the same stage of
  the embedded workflow: a legal one-step move), so the run changes the very field it filters on;
- without: the same job without `on_success`.

Before each run every task's data goes back to `{}` and its status to `pending`, so each run
writes (and, with `on_success`, moves) every task. Outcomes carry no actor id, so both contenders
run `PidCountingToTask`, a plugin that reports its actor's pid to a named counter actor per task
(its cost is on both sides); each actor's share is its count over an even share. The time to the
first write is the platform's first annotation-history entry of the run minus the run's start.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import local_platform, local_ray, meters, tables
from totask_ray import ToTask

NUM_ACTORS = 4
ACTOR_CPUS = 0.25  # 4 actors in one logical CPU: the default 0.5 fills a 2-CPU Ray and starves the reads
FILTER_STATUS = "pending"
MOVED_STATUS = "in_progress"  # same stage as pending: embedded/workflow.py allows the move
COUNTER_NAME = "totask-bench-onsuccess-pids"
CONTENDERS = ("on_success", "without")


class PidCountingToTask(ToTask):
    """The default file hook, plus one fire-and-forget report of this actor's pid per task."""

    _counter: Any = None

    def convert_data_from_file(
        self,
        primary_file_url: str,
        primary_file_name: str | None,
        data_file_url: str,
        data_file_name: str | None,
        task_data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        out = super().convert_data_from_file(
            primary_file_url, primary_file_name, data_file_url, data_file_name, task_data
        )
        if self._counter is None:  # a race between hook threads only looks the actor up twice
            import ray

            self._counter = ray.get_actor(COUNTER_NAME)
        self._counter.add.remote(os.getpid())
        return out


def _counter_cls() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class PidCounter:
        """Tasks per annotator process, as the plugin reports them."""

        def __init__(self) -> None:
            self.counts: dict[int, int] = {}

        def add(self, pid: int) -> None:
            self.counts[pid] = self.counts.get(pid, 0) + 1

        def get(self) -> dict[int, int]:
            return dict(self.counts)

    return PidCounter


def reset_tasks(bp: local_platform.BenchPlatform) -> None:
    """Every task back to no data and the filtered status (the seeded demo mixes statuses)."""
    with bp.store.transaction() as conn:
        conn.execute(
            "UPDATE tasks SET data = '{}', status = ? WHERE project_id = ?", (FILTER_STATUS, bp.project)
        )


def run_one(bp: local_platform.BenchPlatform, report: Path, on_success: bool) -> dict[str, Any]:
    import ray

    from totask_ray import run_to_task

    params: dict[str, Any] = {
        "name": "bench_onsuccess",
        "project": bp.project,
        "method": "file",
        "target_specification_name": local_platform.FILE_TARGET_SPEC,
        "task_filters": {"status__in": [FILTER_STATUS]},
    }
    if on_success:
        params["on_success"] = {"status": MOVED_STATUS}
    job = bp.store.create_job("to_task", params, agent_id=bp.agent)
    reset_tasks(bp)
    counter = _counter_cls().options(name=COUNTER_NAME).remote()
    ray.get(counter.get.remote())  # created and named before any actor looks it up
    wm = local_platform.history_watermark(bp.store)
    try:
        t0, e0 = time.perf_counter(), time.time()
        result = run_to_task(
            params,
            platform=bp.config(),
            action_cls=PidCountingToTask,
            report=report,
            job_id=job,
            progress_bar=False,
            num_actors=NUM_ACTORS,
            actor_cpus=ACTOR_CPUS,
        )
        secs = time.perf_counter() - t0
        counts = ray.get(counter.get.remote())  # actor calls from one caller run in order: all are in
    finally:
        ray.kill(counter)
    n = len(bp.task_ids)
    first = local_platform.first_write_after(bp.store, wm)
    per_actor = sorted(counts.values(), reverse=True)
    per_actor += [0] * (NUM_ACTORS - len(per_actor))  # an actor that got nothing reports nothing
    even = n / NUM_ACTORS
    moved = bp.store._one(
        "SELECT COUNT(*) FROM tasks WHERE project_id = ? AND status = ?", (bp.project, MOVED_STATUS)
    )[0]
    out: dict[str, Any] = {
        "tasks": n,
        "seconds": round(secs, 2),
        "tasks_per_s": round(n / secs, 1),
        "to_first_write_s": None if first is None else round(first - e0, 2),
        "per_actor": per_actor,
        "shares": [round(c / even, 2) for c in per_actor],
        "min_share": round(min(per_actor) / even, 2),
        "moved": int(moved),
        "success": result.success_count,
    }
    want_moved = n if on_success else 0
    if result.success_count != n or sum(per_actor) != n or moved != want_moved:
        out["error"] = (
            f"{result.success_count} of {n} succeeded, {sum(per_actor)} counted, "
            f"{moved} tasks {MOVED_STATUS} (expected {want_moved}): {result.message}"
        )
    return out


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    tasks = 2000 if args.smoke else (args.tasks or 20_000)
    runs = 1 if args.smoke else args.runs
    if not ray_started:
        local_ray.start_ray(args.ray_cpus)
    load0 = [round(x, 2) for x in os.getloadavg()]
    res: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
    with (
        tempfile.TemporaryDirectory(prefix="totask-bench-onsuccess-") as tmp,
        local_platform.platform() as bp,
    ):
        seed_s = local_platform.seed_files(bp, tasks)
        tables.log(f"seeded {tasks} tasks in {seed_s:.1f} s")
        warm = run_one(bp, Path(tmp) / "warm-up.jsonl", on_success=False)  # actors, imports
        tables.log(f"warm-up run (not counted): {warm['tasks_per_s']} tasks/s {warm.get('error', '')}")
        for i in range(runs):
            for name in CONTENDERS:
                out = run_one(bp, Path(tmp) / f"{name}-{i}.jsonl", on_success=name == "on_success")
                res[name].append(out)
                tables.log(
                    f"{name} run {i + 1}: {out['tasks_per_s']} tasks/s, first write {out['to_first_write_s']} s, "
                    f"per actor {out['per_actor']} {out.get('error', '')}"
                )
    med: dict[str, dict[str, Any]] = {}
    rows = []
    for name, rs in res.items():
        firsts = [r["to_first_write_s"] for r in rs if r["to_first_write_s"] is not None]
        med[name] = {
            "tasks_per_s": tables.median([r["tasks_per_s"] for r in rs]),
            "to_first_write_s": tables.median(firsts) if firsts else None,
            "min_share": min(r["min_share"] for r in rs),
            "failed_runs": sum(1 for r in rs if "error" in r),
        }
        rows.append(
            [
                name,
                len(rs),
                tables.fmt(med[name]["tasks_per_s"], 1),
                tables.fmt(med[name]["to_first_write_s"], 2),
                " ; ".join(" / ".join(f"{s:.2f}" for s in r["shares"]) for r in rs),
                f"{med[name]['min_share']:.2f}",
                med[name]["failed_runs"],
            ]
        )
    tables.say(
        tables.table(
            [
                "contender",
                "runs",
                "median tasks/s",
                "median to 1st write s",
                "shares of an even share, per run",
                "min share",
                "failed runs",
            ],
            rows,
            title=f"on_success + status filter, {tasks} tasks, {NUM_ACTORS} actors "
            f"(filter status__in [{FILTER_STATUS}], on_success status {MOVED_STATUS})",
        )
    )
    fw = tables.ratio(med["on_success"]["to_first_write_s"], med["without"]["to_first_write_s"])
    share_line, share_met = tables.target_line(
        "min actor share with on_success (x an even share)", med["on_success"]["min_share"], ">=", 0.5
    )
    fw_line, fw_met = tables.target_line("first write, on_success / without", fw, "<=", 2.0, "x")
    load1 = [round(x, 2) for x in os.getloadavg()]
    tables.say(share_line)
    tables.say(fw_line)
    tables.say(f"load average before {load0}, after {load1}")
    out = {
        "tasks": tasks,
        "runs": runs,
        "num_actors": NUM_ACTORS,
        "median": med,
        "first_write_ratio": fw,
        "targets": {"min_share": share_met, "first_write": fw_met},
        "runs_detail": res,
        "loadavg": [load0, load1],
        "machine": meters.machine_info(),
    }
    tables.dump_json("onsuccess", out)
    return out
