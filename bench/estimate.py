"""The preview's whole-job estimate against the run it projects (issue 28).

    python -m bench estimate [--runs 3] [--sizes file:240,file:960,faces:48,faces:192]

One embedded platform (its own process, on this box) is seeded with the file demo and the faces
demo at each size. Per case and run: `preview(sample=12)` projects the run's wall time
(`totask_ray/preview/estimate.py`), every task's data goes back to `{}`, then `run_to_task` runs
the job for real, in this process on the same local Ray (the warm estimate, as in a notebook: Ray
is up and the method prepared). The figure checked is |measured - projected| / measured <= 0.30, on
the medians of `--runs` runs.

Beside it, where the run's CPU went, from psutil on this box: the platform's process, this driver
process, and the rest of the box (Ray's workers, raylet, GCS, and anyone else's load), in CPU ms
per task; and the stage the run itself named as its bound (`ToTaskResult.bound_by`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import psutil

from bench import local_platform, meters, tables

SAMPLE = 12
DEFAULT_SIZES = "file:240,file:960,faces:48,faces:192"
SMOKE_SIZES = "file:60"
FAST = {"serve_poll_interval_s": 0.5, "serve_ready_timeout_s": 120, "progress_bar": False}
TARGET = 0.30


class CpuSampler:
    """CPU seconds over an interval, per part of the box: the platform's process, this driver, the
    annotator actors (Ray Data's `MapWorker`s), the rest of this process's Ray (raylet, GCS,
    Serve's replicas and proxy, idle workers), and everything else on the box (other people's load),
    which is the box's busy time less the rest. `model`: Serve's replicas. Processes are read every `every_s` (actors die with
    their run, and their CPU would go with them)."""

    PARTS = ("platform", "driver", "annotators", "model", "ray", "others")

    def __init__(self, platform_pid: int | None, every_s: float = 0.5) -> None:
        self.platform_pid = platform_pid
        self.every_s = every_s
        self._seen: dict[int, list[Any]] = {}  # pid: [part, cpu at first sight, cpu at last sight]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _busy(self) -> float:
        t = psutil.cpu_times()
        return t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def _tick(self, first: bool) -> None:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        if self.platform_pid:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(self.platform_pid))
        for p in procs:
            try:
                t = p.cpu_times()
                cpu = t.user + t.system
                part = self._part(p, me.pid)
                row = self._seen.get(p.pid)
                if row is None:
                    self._seen[p.pid] = [part, cpu if first else 0.0, cpu]
                else:
                    row[0], row[2] = part, cpu  # a worker's name changes when it becomes an actor
            except psutil.Error:
                continue

    def _part(self, p: psutil.Process, me: int) -> str:
        if p.pid == self.platform_pid:
            return "platform"
        if p.pid == me:
            return "driver"
        title = " ".join(p.cmdline())
        if "MapWorker" in title:
            return "annotators"
        if "ServeReplica" in title:
            return "model"
        return "ray"

    def __enter__(self) -> CpuSampler:
        self._busy0, self._t0 = self._busy(), time.perf_counter()
        self._tick(first=True)

        def loop() -> None:
            while not self._stop.wait(self.every_s):
                self._tick(first=False)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._tick(first=False)
        self.wall_s = time.perf_counter() - self._t0
        self.parts = dict.fromkeys(self.PARTS, 0.0)
        for part, a, b in self._seen.values():
            self.parts[part] += b - a
        ours = sum(self.parts.values())
        self.parts["others"] = max(0.0, self._busy() - self._busy0 - ours)


def _job(bp: local_platform.BenchPlatform, demo: str, tasks: int) -> dict[str, Any]:
    from totask_ray.embedded.seeds import seed_faces_demo, seed_files_demo

    store, media = bp.store, bp.lp.media_dir
    if demo == "file":
        s = seed_files_demo(store, media, tasks=tasks, seed=5)
        job = {"name": f"Est_file_{tasks}", "method": "file", "target_specification_name": "annotation_data"}
    else:
        s = seed_faces_demo(store, media, tasks=tasks, seed=5)
        job = {
            "name": f"Est_faces_{tasks}", "method": "inference", "pre_processor": s["pre_processor"],
            "pre_processor_params": s["pre_processor_params"], "batch_size": 8,
        }  # fmt: skip
    return {**job, "project": s["project"]}


def run_case(bp: local_platform.BenchPlatform, job: dict[str, Any]) -> dict[str, Any]:
    from totask_ray import run_to_task
    from totask_ray.preview import preview

    config = bp.config()
    local_platform.clear_task_data(bp.store, job["project"])
    t0 = time.perf_counter()
    page = preview(job, platform=config, sample=SAMPLE, **FAST)
    preview_s = time.perf_counter() - t0
    est = page.estimate
    assert est is not None
    local_platform.clear_task_data(bp.store, job["project"])
    with CpuSampler(bp.lp.pid) as cpu:
        t1 = time.perf_counter()
        result = run_to_task(job, platform=config, projected_s=est.projected_s, **FAST)
        wall = time.perf_counter() - t1
    split = cpu.parts
    n = est.tasks
    out: dict[str, Any] = {
        "tasks": n,
        "projected_s": round(est.projected_s, 2),
        "measured_s": round(wall, 2),
        "off": round((wall - est.projected_s) / wall, 3),
        "est_bound": est.bound.name,
        "run_bound": getattr(result, "bound_by", None),
        "preview_s": round(preview_s, 1),
        "estimate": est.to_dict(),
        "cpu_ms_per_task": {k: round(v / n * 1000, 2) for k, v in split.items()},
        "cpu_busy_share": round(sum(split.values()) / (wall * (os.cpu_count() or 1)), 2),
        "success": result.success_count,
    }
    if result.success_count != n:
        out["error"] = result.message
    return out


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    from bench import local_ray

    sizes = SMOKE_SIZES if args.smoke else (args.sizes or DEFAULT_SIZES)
    runs = 1 if args.smoke else args.runs
    cases = [(d, int(n)) for d, n in (c.split(":") for c in sizes.split(","))]
    if not ray_started:
        local_ray.start_ray(args.ray_cpus)
    load0 = [round(x, 2) for x in os.getloadavg()]
    res: dict[str, list[dict[str, Any]]] = {}
    with local_platform.platform() as bp:
        jobs = {f"{d} {n}": _job(bp, d, n) for d, n in cases}
        from totask_ray.preview import preview

        # a first small preview: Ray Data's first work on a fresh Ray spawns its worker processes,
        # seconds that neither the runs below nor a notebook's run after its preview pay
        warm = _job(bp, "file", 4)
        preview(warm, platform=bp.config(), sample=2, **FAST)
        for i in range(runs):
            for name, job in jobs.items():
                out = run_case(bp, job)
                res.setdefault(name, []).append(out)
                tables.log(
                    f"{name} run {i + 1}: projected {out['projected_s']} s, measured {out['measured_s']} s "
                    f"({out['off']:+.0%}); est. bound {out['est_bound']}, run bound {out['run_bound']}; "
                    f"cpu ms/task {out['cpu_ms_per_task']}, busy {out['cpu_busy_share']} "
                    f"{out.get('error', '')}"
                )
    rows, summary, met_all = [], {}, True
    for name, rs in res.items():
        proj = tables.median([r["projected_s"] for r in rs])
        meas = tables.median([r["measured_s"] for r in rs])
        off = (meas - proj) / meas
        met = abs(off) <= TARGET and not any("error" in r for r in rs)
        met_all &= met
        cpu_med = {k: tables.median([r["cpu_ms_per_task"][k] for r in rs]) for k in CpuSampler.PARTS}
        summary[name] = {
            "projected_s": proj,
            "measured_s": meas,
            "off": round(off, 3),
            "met": met,
            "cpu": cpu_med,
        }
        rows.append(
            [
                name, len(rs), f"{proj:.1f}", f"{meas:.1f}", f"{off:+.0%}", rs[-1]["est_bound"],
                rs[-1]["run_bound"], " / ".join(f"{cpu_med[k]:.1f}" for k in CpuSampler.PARTS),
                "yes" if met else "MISSED",
            ]
        )  # fmt: skip
    tables.say(
        tables.table(
            [
                "case",
                "runs",
                "projected s",
                "measured s",
                "off",
                "est. bound",
                "run's bound",
                "CPU ms/task: platform / driver / annotators / model / ray / others",
                "within 30 %",
            ],
            rows,
            title=f"preview's estimate (sample {SAMPLE}) against the run, medians of {runs}",
        )
    )
    load1 = [round(x, 2) for x in os.getloadavg()]
    tables.say(f"load average before {load0}, after {load1}")
    out = {
        "runs": runs,
        "sample": SAMPLE,
        "summary": summary,
        "all_met": met_all,
        "runs_detail": res,
        "loadavg": [load0, load1],
        "machine": meters.machine_info(),
    }
    tables.dump_json("estimate", out)
    return out
