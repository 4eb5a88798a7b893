"""Start-up: `totask-ray run job.yaml --address <warm cluster>` to the first annotation on the platform.

    python -m bench startup [--tasks 10000] [--runs 3]

The local Ray this bench started is the warm cluster; a project of `--tasks` file-method tasks is
seeded on an embedded platform. Two kinds of runs, interleaved:

- cli: the console script `totask-ray run job.yaml --address <gcs address>` as a subprocess. The
  clock starts just before the spawn; the first annotation's time is the platform's own
  timestamp of the first row written to its annotation history (polled every 20 ms); "done" is
  the process's exit.
- breakdown: the same CLI command run inside `python -m bench.startup --child`, which wraps (in
  that process only, product code untouched) the steps and the pipeline generator with timers and,
  after the run, reads Ray's task timeline (`ray.timeline()`) for the read tasks and the annotator
  actors' constructors. Phases: process start + imports, connect to Ray, platform calls
  (initialize, prepare, fetch_tasks), Ray Data plan (annotate step start -> first annotator
  constructor starts), actor start (constructor), first batch (constructor done -> first
  annotation on the platform), and the first outcome batch back in the driver.

Target: cli spawn -> first annotation <= 10 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

T_MAIN = time.time()
MARK = "__BENCH_STARTUP__"


# -- the instrumented CLI (a child process) --------------------------------------------------------


def child(argv: list[str]) -> int:
    marks: dict[str, float] = {"main": T_MAIN}
    import totask_ray.cli as cli

    marks["cli_imported"] = time.time()
    import totask_ray.cluster as cluster
    import totask_ray.run.steps as steps

    marks["imports"] = time.time()

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            marks.setdefault(f"{name}_start", time.time())
            try:
                return fn(*a, **k)
            finally:
                marks.setdefault(f"{name}_end", time.time())

        return wrapper

    # the CLI connects first (totask_ray.cluster), the annotate step finds Ray already up
    cluster.ensure_ray = steps.ensure_ray = timed("ray_connect", cluster.ensure_ray)
    for cls in (steps.Initialize, steps.Prepare, steps.FetchTasks, steps.Annotate):
        cls.run = timed(cls.name, cls.run)
    original = steps.run_pipeline

    def run_pipeline(spec: Any) -> Any:
        marks["pipeline_start"] = time.time()
        for batch in original(spec):
            marks.setdefault("first_outcome_batch", time.time())
            yield batch

    steps.run_pipeline = run_pipeline
    code = 0
    try:
        cli.app(argv, standalone_mode=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception as exc:  # typer in non-standalone mode returns the exit code or raises
        code = int(getattr(exc, "exit_code", 1))
    marks["done"] = time.time()
    timeline: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        timeline = _timeline_marks(marks.get("pipeline_start", 0.0))
    sys.stdout.write(MARK + json.dumps({"code": code, "marks": marks, "timeline": timeline}) + "\n")
    sys.stdout.flush()
    return 0


def _timeline_marks(since: float) -> dict[str, Any]:
    """First read task and first annotator constructor after `since`, from Ray's task events
    (they reach the GCS about once a second, so wait for the constructor to show up)."""
    import ray

    out: dict[str, Any] = {}

    def after(e: dict[str, Any]) -> bool:
        return e.get("ph") == "X" and e["ts"] / 1e6 >= since - 1

    for _ in range(12):
        events = ray.timeline()  # "cat": "task::MapWorker(MapBatches(FileAnnotator)).__init__", ts/dur in us
        init = [
            e
            for e in events
            if after(e) and "FileAnnotator" in str(e.get("cat")) and e.get("name") == "__init__"
        ]
        reads = [e for e in events if after(e) and str(e.get("cat", "")).startswith("task::Read")]
        if init:
            first = min(init, key=lambda e: e["ts"])
            out["actor_init_start"] = first["ts"] / 1e6
            out["actor_init_end"] = (first["ts"] + first.get("dur", 0)) / 1e6
            out["actors"] = len(init)
            if reads:
                r = min(reads, key=lambda e: e["ts"])
                out["read_start"] = r["ts"] / 1e6
                out["read_end"] = (r["ts"] + r.get("dur", 0)) / 1e6
            return out
        time.sleep(0.5)
    return out


# -- the bench ------------------------------------------------------------------------------------


def _job_file(bp: Any, path: Path) -> Path:
    import yaml

    params = {"name": "bench_startup", "project": bp.project, "method": "file",
              "target_specification_name": "annotation_data", "task_filters": {}}  # fmt: skip
    path.write_text(yaml.safe_dump(params))
    return path


def _spawn(bp: Any, cmd: list[str], out: Path) -> tuple[float, float | None, float, int, str]:
    """(spawn epoch, first annotation epoch, exit epoch, exit code, stdout)."""
    from bench import environment, local_platform

    env = environment.env_for_children()
    env["SYNAPSE_HOST"] = bp.url
    env["SYNAPSE_ACCESS_TOKEN"] = bp.token
    # each run writes every task: the run before it left the same data there, which totask-ray
    # would find unchanged and not write again (no first annotation to time)
    local_platform.clear_task_data(bp.store, bp.project)
    wm = local_platform.history_watermark(bp.store)
    first = None
    with open(out, "w") as fo, open(out.with_suffix(".err"), "w") as fe:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=environment.ROOT)
        while proc.poll() is None:
            if first is None:
                first = local_platform.first_write_after(bp.store, wm)
            time.sleep(0.02)
        t_end = time.time()
    if first is None:
        first = local_platform.first_write_after(bp.store, wm)
    return t0, first, t_end, proc.returncode, out.read_text()


def run_cli(bp: Any, job: Path, address: str, n: int) -> dict[str, Any]:
    exe = str(Path(sys.executable).with_name("totask-ray"))
    t0, first, end, rc, _ = _spawn(bp, [exe, "run", str(job), "--address", address], bp.tmp / "cli.out")
    res = {"to_first_annotation_s": None if first is None else round(first - t0, 2), "to_done_s": round(end - t0, 2),
           "exit": rc}  # fmt: skip
    if rc != 0 or first is None:
        res["error"] = f"exit {rc}: {(bp.tmp / 'cli.err').read_text()[-400:]}"
    return res


PHASES = (
    ("process start + imports", "spawn", "imports"),
    ("connect to Ray", "ray_connect_start", "ray_connect_end"),
    ("params, CLI set-up, between steps", None, None),
    ("platform calls (initialize, prepare, fetch_tasks)", "initialize_start", "fetch_tasks_end"),
    ("Ray Data plan (annotate start -> actor constructor)", "annotate_task_data_start", "actor_init_start"),
    ("actor start (constructor)", "actor_init_start", "actor_init_end"),
    ("first batch (constructor done -> first annotation)", "actor_init_end", "first_annotation"),
)


def run_breakdown(bp: Any, job: Path, address: str) -> dict[str, Any]:
    from bench import tables

    cmd = [sys.executable, "-m", "bench.startup", "--child", "run", str(job), "--address", address]
    t0, first, end, rc, out = _spawn(bp, cmd, bp.tmp / "child.out")
    line = next((ln for ln in out.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        return {"error": f"child exit {rc}: {(bp.tmp / 'child.err').read_text()[-400:]}"}
    data = json.loads(line[len(MARK) :])
    m = dict(data["marks"])
    m.update(data["timeline"])
    m["spawn"] = t0
    if first is not None:
        m["first_annotation"] = first
    res: dict[str, Any] = {"to_first_annotation_s": None if first is None else round(first - t0, 2),
                           "to_done_s": round(end - t0, 2)}  # fmt: skip
    phases = {}
    for name, a, b in PHASES:
        if a is None:
            continue
        phases[name] = round(m[b] - m[a], 3) if a in m and b in m else None
    known = sum(v for v in phases.values() if v is not None)
    if first is not None:
        phases["params, CLI set-up, between steps"] = round(first - t0 - known, 3)
    phases = {name: phases.get(name) for name, _, _ in PHASES}
    if "first_outcome_batch" in m and first is not None:
        phases["(first outcome batch back in the driver, after the first annotation)"] = round(
            m["first_outcome_batch"] - first, 3
        )
    if "read_start" in m:
        phases["(first read task: starts after annotate start / lasts)"] = (
            f"{m['read_start'] - m.get('annotate_task_data_start', m['read_start']):.2f} / {m['read_end'] - m['read_start']:.2f}"
        )
    phases["(imports of which `import totask_ray.cli`)"] = round(m["cli_imported"] - m["main"], 3)
    phases["(python interpreter start: spawn -> bench module running)"] = round(m["main"] - t0, 3)
    res["phases"] = phases
    res["actors"] = m.get("actors")
    if rc != 0 or data["code"] not in (0,) or first is None:
        res["error"] = f"exit {rc}/{data['code']}"
    tables.log("startup breakdown: " + json.dumps(phases))
    return res


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    from bench import local_platform, local_ray, meters, tables

    n = args.tasks if args.tasks and args.bench == "startup" else (200 if args.smoke else 10_000)
    runs = 1 if args.smoke else args.runs
    if not ray_started:
        local_ray.start_ray(args.ray_cpus)
    address = local_ray.ray_address()
    with local_platform.platform() as bp:
        local_platform.seed_files(bp, n)
        job = _job_file(bp, bp.tmp / "job.yaml")
        results: dict[str, list[dict[str, Any]]] = {"cli": [], "breakdown": []}
        load = meters.LoadSampler().start()
        for r in range(runs):
            if not args.smoke:  # smoke: the instrumented run goes through the same CLI command
                res = run_cli(bp, job, address, n)
                results["cli"].append(res)
                tables.log(f"startup run {r + 1}/{runs} cli: {json.dumps(res)}")
            res = run_breakdown(bp, job, address)
            results["breakdown"].append(res)
            tables.log(f"startup run {r + 1}/{runs} breakdown: first annotation {res.get('to_first_annotation_s')} s "
                  f"{res.get('error', '')}")  # fmt: skip
        load.stop()

    cli_ok = [x for x in results["cli"] if "error" not in x]
    bd_ok = [x for x in results["breakdown"] if "error" not in x]
    first_cli = tables.median([x["to_first_annotation_s"] for x in cli_ok]) if cli_ok else None
    rows = [
        ["totask-ray run (cli)", tables.fmt(first_cli, 2), tables.fmt(tables.median([x["to_done_s"] for x in cli_ok]) if cli_ok else None, 1),
         " ".join(tables.fmt(x.get("to_first_annotation_s"), 2) for x in results["cli"]),
         f"{len(results['cli']) - len(cli_ok)}/{len(results['cli'])}"],
        ["same, instrumented (breakdown)",
         tables.fmt(tables.median([x["to_first_annotation_s"] for x in bd_ok]) if bd_ok else None, 2),
         tables.fmt(tables.median([x["to_done_s"] for x in bd_ok]) if bd_ok else None, 1),
         " ".join(tables.fmt(x.get("to_first_annotation_s"), 2) for x in results["breakdown"]),
         f"{len(results['breakdown']) - len(bd_ok)}/{runs}"],
    ]  # fmt: skip
    tables.say(tables.table(["run", "spawn -> first annotation s", "spawn -> done s", "runs s", "failed runs"], rows,
                  f"Start-up, warm cluster, {n:,} tasks, medians of {runs} interleaved runs"))  # fmt: skip
    names = list(bd_ok[0]["phases"]) if bd_ok else []
    prow = []
    for name in names:
        vals = [x["phases"].get(name) for x in bd_ok]
        if all(isinstance(v, (int, float)) or v is None for v in vals):
            prow.append(
                [
                    name,
                    tables.fmt(tables.median([v for v in vals if v is not None]), 2),
                    " ".join(tables.fmt(v, 2) for v in vals),
                ]
            )
        else:
            prow.append([name, str(vals[len(vals) // 2]), " ".join(str(v) for v in vals)])
    tables.say(tables.table(["phase (instrumented runs)", "median s", "runs s"], prow, "Start-up breakdown"))
    tables.say(load.text())
    text, met = tables.target_line("spawn -> first annotation (cli)", first_cli, "<=", 10.0, " s")
    tables.say("  " + text)
    out = {
        "tasks": n,
        "results": results,
        "target": {"value": first_cli, "met": met, "text": text},
        "load": load.summary(),
    }
    tables.dump_json("startup", out)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        sys.exit(child(sys.argv[2:]))
    print("run it as `python -m bench startup`", file=sys.stderr)
    sys.exit(2)
