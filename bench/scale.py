"""The data plane at scale: listing a million ids, and what a resume costs against a fresh run.

    python -m bench scale [--sizes 100000,300000,1000000] [--runs 3] [--resume-tasks 1000000]

1. **Seeding**: tasks without data units, made by one SQL statement (a recursive CTE inside one
   transaction) on the embedded platform's file; the seconds per size are printed.
2. **Listing** (the Synapse client against the embedded platform over HTTP, 500 ids a page, one
   caller): every id of the project by *offset pages* (`page=N`) and by *id ranges* (keyset: the
   ranges a run cuts, 1,000 ids each, every page resuming after its last id), ids/s and the median
   time of the last 20 pages against the first 20; once on a quiet platform and once while another
   connection commits every 20 ms (as a run's `on_success` writes do: the server's cached id list
   goes stale, and an offset page then walks the whole listing again). Offset pages under writes
   are quadratic: they run at the smaller sizes only, and the largest is an estimate.
3. **Resume against fresh**: a driver process (`--child`, on this bench's Ray) runs the pipeline
   over `--resume-tasks` tasks with a stand-in annotator that only counts ids (the data plane alone:
   listing, exclusion, blocks, outcomes back), fresh and then resuming from a report of half of them
   done (every other id; `run.steps.done_in_report` reads it as a run does). Measured: the object
   store's peak bytes (sampled every 0.2 s from the raylet), the driver's peak RSS (VmHWM), and the
   pickled bytes of all read tasks. Target: a resume costs at most 50 MB more than a fresh run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import bench.environment  # noqa: F401 - scrubs the environment before ray is imported

MARK = "__BENCH_SCALE__"
PAGE = 500
EDGE = 20  # pages averaged at each end of a listing


# -- seeding ---------------------------------------------------------------------------------------


def seed_tasks(store: Any, n: int) -> tuple[int, float]:
    """A project of `n` pending tasks without data units, in one statement; (project, seconds)."""
    t0 = time.perf_counter()
    project = store.create_project(f"scale {n}")
    now = "2026-01-01T00:00:00.000000Z"
    with store.transaction() as c:
        store._task_gen += 1
        first = int(c.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM tasks").fetchone()[0])
        c.execute(
            "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < ?)"
            " INSERT INTO tasks (id, project_id, data_unit_id, status, assignee, created_at, updated_at, data)"
            " SELECT ? + i, ?, NULL, 'pending', NULL, ?, ?, '{}' FROM s",
            (n, first, project, now, now),
        )
    return project, time.perf_counter() - t0


# -- listing ---------------------------------------------------------------------------------------


class Writer:
    """Another connection committing every `every_s` (a task of another project changes status)."""

    def __init__(self, db: Path, every_s: float = 0.02):
        from totask_ray.embedded.store import Store

        self.store = Store(db)
        self.project = self.store.create_project("scale writer")
        self.task = self.store.create_tasks_bulk(self.project, [{"status": "pending"}])[0]
        self.every_s = every_s
        self.halt = threading.Event()
        self.commits = 0

    def _run(self) -> None:
        flip = ("pending", "in_progress")
        while not self.halt.wait(self.every_s):
            self.store.update_task(self.task, status=flip[self.commits % 2])
            self.commits += 1

    def __enter__(self) -> Writer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.thread.join()


def list_offset(client: Any, project: int, n: int) -> tuple[int, list[float]]:
    times, total, page = [], 0, 1
    while True:
        t0 = time.perf_counter()
        got = client.task_id_page(project, {}, page=page, page_size=PAGE)
        times.append(time.perf_counter() - t0)
        total += len(got.ids)
        if not got.next:
            return total, times
        page += 1


def list_ranges(client: Any, project: int, n: int) -> tuple[int, list[float]]:
    from totask_ray.pipeline.source import PAGES_PER_READ_TASK, id_ranges

    lo, hi = client.id_bounds(project, {})
    times, total = [], 0
    for after, upto in id_ranges(lo, hi, -(-n // (PAGE * PAGES_PER_READ_TASK))):
        while True:
            t0 = time.perf_counter()
            got = client.task_id_range_page(project, {}, after=after, upto=upto, page_size=PAGE)
            times.append(time.perf_counter() - t0)
            total += len(got.ids)
            if not got.next or not got.ids:
                break
            after = got.ids[-1]
    return total, times


def listing_row(how: str, n: int, writes: bool, runs: list[tuple[int, list[float], float]]) -> dict[str, Any]:
    from bench import tables

    listed = {r[0] for r in runs}
    secs = tables.median([r[2] for r in runs])
    first = tables.median([tables.median(r[1][:EDGE]) for r in runs]) * 1000
    last = tables.median([tables.median(r[1][-EDGE:]) for r in runs]) * 1000
    return {"how": how, "tasks": n, "writes": writes, "listed_ok": listed == {n}, "seconds": round(secs, 2),
            "ids_per_s": round(n / secs), "first_ms": round(first, 2), "last_ms": round(last, 2),
            "last_over_first": round(last / first, 2) if first else None, "runs": len(runs)}  # fmt: skip


# -- resume against fresh: the measured driver (a child process) -----------------------------------


class CountIds:
    """A stand-in annotator: counts the ids of each batch (the data plane alone is measured)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        return {"n": np.array([len(batch["task_id"])], dtype=np.int64)}


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--project", type=int, required=True)
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--resume", default=None)
    a = ap.parse_args(argv)

    import psutil
    import ray

    from totask_ray.cluster import ensure_ray
    from totask_ray.params import ToTaskParams
    from totask_ray.pipeline.run import AnnotatorSpec, PipelineSpec, listing, run_pipeline
    from totask_ray.pipeline.spec import RunOptions, RunSpec
    from totask_ray.platform.synapse.client import SynapseClient, SynapseConfig
    from totask_ray.run.steps import done_in_report

    ensure_ray(a.address)
    import ray.data  # imported by the pipeline: in the baseline, not the growth

    me = psutil.Process()
    baseline = me.memory_info().rss / 2**20
    params = ToTaskParams.parse({"name": "scale", "project": a.project, "target_specification_name": "x"})
    # (bench.environment, imported above, scrubs SYNAPSE_*: the platform comes under its own names)
    config = SynapseConfig(host=os.environ["SCALE_HOST"], access_token=os.environ["SCALE_TOKEN"])
    spec = RunSpec(params=params, options=RunOptions(num_actors=1), platform=config)
    t0 = time.perf_counter()
    exclude = done_in_report(Path(a.resume)) if a.resume else None
    load_s = time.perf_counter() - t0
    pspec = PipelineSpec(
        run=spec, annotator=AnnotatorSpec(CountIds, {}), total=a.total, exclude=exclude,
        lister=SynapseClient(spec.platform),
    )  # fmt: skip
    source = listing(pspec)
    read_bytes = sum(len(ray.cloudpickle.dumps(t)) for t in source.get_read_tasks(1))
    reads = source.read_count
    del source
    t1 = time.perf_counter()
    seen = sum(int(b["n"].sum()) for b in run_pipeline(pspec))
    out = {
        "seen": seen, "done": 0 if exclude is None else len(exclude), "load_s": round(load_s, 2),
        "seconds": round(time.perf_counter() - t1, 1), "baseline_mb": round(baseline, 1),
        "peak_rss_mb": round(_vm_hwm_mb(), 1), "read_tasks": reads, "read_task_bytes": read_bytes,
    }  # fmt: skip
    sys.stdout.write(MARK + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def _store_used(state: Any) -> int:
    from ray._private.internal_api import get_memory_info_reply

    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def run_child(bp: Any, project: int, total: int, address: str, resume: Path | None) -> dict[str, Any]:
    from ray._private.internal_api import get_state_from_address

    from bench import environment

    env = environment.env_for_children()
    env["SCALE_HOST"], env["SCALE_TOKEN"] = bp.url, bp.token
    cmd = [sys.executable, "-m", "bench.scale", "--child", "--address", address, "--project", str(project),
           "--total", str(total)] + (["--resume", str(resume)] if resume else [])  # fmt: skip
    state = get_state_from_address(address)
    floor = _store_used(state)
    peak = [floor]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=environment.ROOT
    )
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _store_used(state))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    line = next((ln for ln in out.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        return {"error": f"driver exit {proc.returncode}: {err[-1500:]}"}
    res = json.loads(line[len(MARK) :])
    res["store_peak_mb"] = round((peak[0] - floor) / 2**20, 1)
    return res


def write_report(path: Path, ids: range) -> None:
    """A report of every other id finished (`success`), as an earlier run would have left it."""
    with open(path, "w", encoding="utf-8") as f:
        for tid in ids[::2]:
            f.write(f'{{"task_id":{tid},"status":"success"}}\n')


# -- the bench ------------------------------------------------------------------------------------


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    from bench import local_platform, local_ray, tables

    if args.smoke:
        sizes, runs, resume_n, offset_writes_max = [3_000], 1, 3_000, 3_000
    else:
        sizes = [int(s) for s in (args.sizes or "100000,300000,1000000").split(",")]
        runs, resume_n, offset_writes_max = args.runs, args.resume_tasks or max(sizes), 300_000
    if not ray_started:
        local_ray.start_ray(args.ray_cpus)
    address = local_ray.ray_address()
    out: dict[str, Any] = {"seed": {}, "listing": [], "resume": {}}
    with local_platform.platform() as bp:
        projects = {}
        for n in sorted(set(sizes) | {resume_n}):
            projects[n], secs = seed_tasks(bp.store, n)
            out["seed"][n] = round(secs, 2)
            tables.log(f"scale: seeded {n:,} tasks in {secs:.1f} s")
        tables.say(tables.table(["tasks", "seconds to seed"], [[f"{n:,}", f"{s:.1f}"] for n, s in out["seed"].items()],
                                "Seeding tasks without data units (one recursive-CTE INSERT)"))  # fmt: skip

        from totask_ray.platform.synapse.client import SynapseClient

        rows = []
        with SynapseClient(bp.config()) as client:
            for writes in (False, True):
                for n in sizes:
                    for how, walk in (("offset pages", list_offset), ("id ranges", list_ranges)):
                        if how == "offset pages" and writes and n > offset_writes_max:
                            continue  # quadratic: estimated from the smaller sizes below
                        results = []
                        for _ in range(runs):
                            t0 = time.perf_counter()
                            if writes:
                                with Writer(bp.store.db_path) as w:
                                    got, times = walk(client, projects[n], n)
                                tables.log(f"  (the writer committed {w.commits} times)")
                            else:
                                got, times = walk(client, projects[n], n)
                            results.append((got, times, time.perf_counter() - t0))
                        row = listing_row(how, n, writes, results)
                        rows.append(row)
                        tables.log("scale listing: " + json.dumps(row))
        out["listing"] = rows
        est = _offset_estimate(rows, sizes, offset_writes_max)
        table_rows = [[r["how"], f"{r['tasks']:,}", "yes" if r["writes"] else "no", tables.fmt(r["ids_per_s"]),
                       tables.fmt(r["first_ms"], 2), tables.fmt(r["last_ms"], 2), tables.fmt(r["last_over_first"], 2),
                       "ok" if r["listed_ok"] else "WRONG COUNT"] for r in rows]  # fmt: skip
        table_rows += est
        tables.say(tables.table(
            ["listing", "tasks", "writes meanwhile", "ids/s", f"first {EDGE} pages ms", f"last {EDGE} pages ms",
             "last/first", "every id once"], table_rows,
            f"Listing every id, {PAGE} a page, one caller, medians of {runs}",
        ))  # fmt: skip

        # resume against fresh
        report = bp.tmp / "done.jsonl"
        first = int(bp.store._one("SELECT MIN(id) FROM tasks WHERE project_id = ?", (projects[resume_n],))[0])
        write_report(report, range(first, first + resume_n))
        res: dict[str, list[dict[str, Any]]] = {"fresh": [], "resume": []}
        for r in range(runs if resume_n <= 300_000 else 1):
            for kind in ("fresh", "resume"):
                got = run_child(
                    bp, projects[resume_n], resume_n, address, report if kind == "resume" else None
                )
                res[kind].append(got)
                tables.log(f"scale resume run {r + 1} {kind}: " + json.dumps(got))
        out["resume"] = res

    summary = {}
    for kind, rs in res.items():
        good = [x for x in rs if "error" not in x]
        summary[kind] = {k: tables.median([x[k] for x in good]) if good else None
                         for k in ("seen", "seconds", "store_peak_mb", "peak_rss_mb", "baseline_mb", "read_task_bytes",
                                   "read_tasks", "load_s")}  # fmt: skip
    f, s = summary["fresh"], summary["resume"]
    byval = (s["read_tasks"] or 0) * (resume_n // 2) * 8 / 2**20
    tables.say(tables.table(
        ["run", "ids annotated", "seconds", "object store peak MB", "driver peak RSS MB", "read tasks",
         "read tasks pickled KB", "done ids loaded in s"],
        [[k, tables.fmt(v["seen"]), tables.fmt(v["seconds"], 1), tables.fmt(v["store_peak_mb"], 1),
          tables.fmt(v["peak_rss_mb"], 1), tables.fmt(v["read_tasks"]), tables.fmt((v["read_task_bytes"] or 0) / 1024, 1),
          tables.fmt(v["load_s"], 2)] for k, v in summary.items()],
        f"{resume_n:,} tasks, fresh and resuming with {resume_n // 2:,} done (stand-in annotator), "
        f"{'median of ' + str(runs) if resume_n <= 300_000 else 'one run each'}",
    ))  # fmt: skip
    tables.say(
        f"  (the done ids copied into every read task, as before: {byval:,.0f} MB of read tasks, est.)"
    )
    extra = None
    if None not in (f["store_peak_mb"], s["store_peak_mb"], f["peak_rss_mb"], s["peak_rss_mb"]):
        extra = max(s["store_peak_mb"] - f["store_peak_mb"], 0) + max(s["peak_rss_mb"] - f["peak_rss_mb"], 0)
    text, met = tables.target_line(
        "resume's extra cost (object store + driver RSS)", extra, "<=", 50.0, " MB"
    )
    tables.say("  " + text)
    out.update({"summary": summary, "target": {"value": extra, "met": met, "text": text}})
    tables.dump_json("scale", out)
    return out


def _offset_estimate(rows: list[dict[str, Any]], sizes: list[int], measured_max: int) -> list[list[str]]:
    """Offset pages under writes at the sizes not run: each page rebuilds the whole listing, so the
    time per page grows with n and the whole walk with n^2 (scaled from the largest size run)."""
    base = [r for r in rows if r["how"] == "offset pages" and r["writes"]]
    if not base:
        return []
    b = max(base, key=lambda r: r["tasks"])
    est = []
    for n in sizes:
        if n > measured_max:
            k = n / b["tasks"]
            est.append(["offset pages (est.)", f"{n:,}", "yes", f"{b['ids_per_s'] / k:,.0f} est.",
                        f"{b['first_ms'] * k:,.1f} est.", f"{b['last_ms'] * k:,.1f} est.", "", ""])  # fmt: skip
    return est


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        sys.exit(child(sys.argv[2:]))
    print("run it as `python -m bench scale`", file=sys.stderr)
    sys.exit(2)
