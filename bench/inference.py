"""Inference method, images/s with the faces app (OpenCV Haar cascade on Ray Serve).

    python -m bench inference [--tasks 160] [--runs 3]

The same images everywhere: skimage's astronaut (one face) alternating with four face-free
pictures (coffee, chelsea, rocket, motorcycle), written by `totask_ray.embedded.seeds.write_sample_images`
into the embedded platform's media dir, one task per image. Contenders, interleaved run by run:

- raw 1 thread: `HaarFaceDetector().detect(images, InferenceParams())` in this process on the
  decoded images, in batches of the release's `max_batch_size` (16), with OpenCV on one thread,
  as the 1-CPU replica runs it (the replica sets `cv2.setNumThreads(<its CPUs>)`);
- raw N threads: the same with OpenCV on all N cores of the machine (N = `os.cpu_count()`);
- raw all cores: N processes of one OpenCV thread each, each detecting its share of the images
  (started and warmed before the clock; the clock runs from handing out the shares to the last
  answer). The target baseline is the faster of raw N threads and raw all cores in the same run:
  what the model alone can do with every core of this box;
- raw decode+detect: PIL decode of the file bytes + detection, one thread (the per-image work the
  pipeline cannot avoid);
- sdk: the public SDK's inference path (`plugins/{code}/run/` through the platform's plugin
  runner), when the platform has one;
- totask-ray: `run_to_task` (method inference, defaults) with the faces release stored on the
  platform (`serve_apps/faces/config.yaml`), on the warm local Ray; the app is deployed once by a
  warm-up run before the timed runs (deploy time reported separately).

totask-ray writes only the tasks whose image has a face (an empty result fails its task and
writes nothing, like the SDK), so its steady-state rate is the write rate between the 10 % and 90 %
marks divided by the share of tasks written.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from bench import environment, local_platform, local_ray, meters, public_sdk, tables

IMAGE_CYCLE = (
    "astronaut",
    "coffee",
    "astronaut",
    "chelsea",
    "astronaut",
    "rocket",
    "astronaut",
    "motorcycle",
)
RUNNER_MODULE = environment.ROOT / "totask_ray" / "embedded" / "ray_runner.py"


def _release_config(version: str) -> dict[str, Any]:
    from totask_ray.serving.config import load_release_config

    cfg = load_release_config(environment.ROOT / "serve_apps" / "faces").model_dump(
        mode="json", exclude_none=True
    )
    cfg["version"] = version
    # The SDK contender calls the app's own route, which fetches the image from the platform on
    # loopback: a host the route refuses unless allow-listed (the embedded agent adds it when it
    # deploys; here a totask-ray warm-up run deploys the app, so the bench's release says so).
    options = cfg["actions"]["deployment"].setdefault("options", {})
    options["allowed_hosts"] = [*options.get("allowed_hosts", []), "127.0.0.1"]
    return cfg


def _project(bp: local_platform.BenchPlatform, paths: list[str]) -> tuple[int, list[int]]:
    store = bp.store
    dc = store.create_data_collection(
        "bench inference", [{"name": "image_1", "is_primary": True, "file_type": "image"}]
    )
    project = store.create_project("bench inference", dc)
    units = store.create_data_units_bulk(
        dc, [{"files": {"image_1": {"path": p, "is_primary": True}}} for p in paths]
    )
    rows = [{"data_unit": du, "status": "pending"} for du in units]
    return project, store.create_tasks_bulk(project, rows)


def _decode(body: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(body)) as img:
        return np.asarray(img.convert("RGB"))


def run_raw(images: list[Any], batch: int, threads: int, bodies: list[bytes] | None = None) -> dict[str, Any]:
    import cv2

    from serve_apps.faces.app import HaarFaceDetector
    from totask_ray.serving.params import InferenceParams

    cv2.setNumThreads(threads)
    model = HaarFaceDetector()
    params = InferenceParams()
    model.detect(images[:1], params)  # warm
    me = os.getpid()
    with meters.CpuMeter({"bench process": lambda: [me]}) as cpu:
        t0 = time.perf_counter()
        found = 0
        for i in range(0, len(images), batch):
            chunk = (
                [_decode(b) for b in bodies[i : i + batch]] if bodies is not None else images[i : i + batch]
            )
            found += sum(1 for d in model.detect(chunk, params) if d)
        secs = time.perf_counter() - t0
    return {"images": len(images), "seconds": round(secs, 3), "images_per_s": round(len(images) / secs, 2),
            "steady_per_s": None, "with_faces": found, "cpu": cpu.shares()}  # fmt: skip


_POOL_STATE: dict[str, Any] = {}


def _pool_init(bodies: list[bytes]) -> None:
    import cv2

    from serve_apps.faces.app import HaarFaceDetector

    cv2.setNumThreads(1)
    _POOL_STATE["images"] = [_decode(b) for b in bodies]
    _POOL_STATE["model"] = HaarFaceDetector()


def _pool_detect(span: tuple[int, int, int]) -> int:
    from totask_ray.serving.params import InferenceParams

    start, stop, batch = span
    images, model, params = _POOL_STATE["images"], _POOL_STATE["model"], InferenceParams()
    found = 0
    for i in range(start, stop, batch):
        found += sum(1 for d in model.detect(images[i : min(i + batch, stop)], params) if d)
    return found


class RawPool:
    """N processes, one OpenCV thread each, the decoded images loaded in each: the raw model on
    every core without threads (what N replicas of 1 CPU could do at best)."""

    def __init__(self, bodies: list[bytes], procs: int) -> None:
        from multiprocessing import get_context

        self.procs = procs
        self.n = len(bodies)
        self.pool = get_context("spawn").Pool(procs, initializer=_pool_init, initargs=(bodies,))
        self.pool.map(_pool_detect, [(0, 1, 1)] * procs, chunksize=1)  # every worker loaded and warm

    def run(self, batch: int) -> dict[str, Any]:
        share = -(-self.n // self.procs)
        spans = [(i, min(i + share, self.n), batch) for i in range(0, self.n, share)]
        pids = [p.pid for p in self.pool._pool]  # type: ignore[attr-defined]
        with meters.CpuMeter({"bench pool": lambda: pids}) as cpu:
            t0 = time.perf_counter()
            found = sum(self.pool.map(_pool_detect, spans, chunksize=1))
            secs = time.perf_counter() - t0
        return {"images": self.n, "seconds": round(secs, 3), "images_per_s": round(self.n / secs, 2),
                "steady_per_s": None, "with_faces": found, "cpu": cpu.shares()}  # fmt: skip

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def run_totask(
    bp: local_platform.BenchPlatform, project: int, n: int, release: int, report: Path
) -> dict[str, Any]:
    from totask_ray import run_to_task

    params = {"name": "bench_inference", "project": project, "method": "inference", "pre_processor": release,
              "task_filters": {}}  # fmt: skip
    job = bp.store.create_job("to_task", params, agent_id=bp.agent)
    local_platform.clear_task_data(bp.store, project)
    wm = local_platform.history_watermark(bp.store)
    me = os.getpid()
    groups = {
        "driver": lambda: [me],
        "ray": lambda: meters.descendants(lambda: set(bp.pid_list())),
        "server": bp.pid_list,
    }
    e0 = time.time()
    with meters.CpuMeter(groups) as cpu:
        t0 = time.perf_counter()
        result = run_to_task(params, platform=bp.config(), report=report, job_id=job, progress_bar=False,
                             serve_poll_interval_s=0.5)  # fmt: skip
        secs = time.perf_counter() - t0
    writes = local_platform.writes_since(bp.store, wm)
    share = len(writes) / n if n else 0
    steady = local_platform.steady_rate([t for _, t in writes])
    out = {
        "images": n,
        "seconds": round(secs, 3),
        "images_per_s": round(n / secs, 2),
        "steady_per_s": None if steady is None or share == 0 else round(steady / share, 2),
        "with_faces": len(writes),
        "cpu": cpu.shares(),
        "failed": result.failed_count,
        "to_first_write_s": round(writes[0][1] - e0, 2) if writes else None,
    }
    other = [f.error for f in result.failures if f.error != "empty inference result"]
    if result.success_count + result.failed_count != n or other:
        out["error"] = f"{result.message}; {other[:2]}"
    return out


RUNNER = "totask_ray.embedded.ray_runner:ray_plugin_runner"


def sdk_unavailable(smoke: bool) -> tuple[Path | None, str | None]:
    if not RUNNER_MODULE.exists():
        return None, "n/a: no platform runner (totask_ray/embedded/ray_runner.py is not there)"
    py, why = public_sdk.sdk_python(build=not smoke)
    return (py, None) if py is not None else (None, f"n/a: {why}")


def run_sdk(
    bp: local_platform.BenchPlatform, sdk_py: Path, project: int, n: int, release: int
) -> dict[str, Any]:
    """The SDK's ToTaskAction, inference method: one `plugins/faces/run/` POST per task (windows of
    the release's max_batch_size, concurrent inside a window), which the platform's Ray runner
    forwards to the app's HTTP route; the replica downloads the image from the platform itself."""
    params = {"name": "bench_sdk_inference", "project": project, "agent": bp.agent, "method": "inference",
              "pre_processor": release, "model": 1, "pre_processor_params": {}, "task_filters": {}}  # fmt: skip
    wm = local_platform.history_watermark(bp.store)
    groups = {"ray": lambda: meters.descendants(lambda: set(bp.pid_list())), "server": bp.pid_list}
    e0 = time.time()
    with meters.CpuMeter(groups) as cpu:
        r = public_sdk.run_sdk_totask(sdk_py, bp, params, bp.tmp / "sdk")
    cpu.add("sdk", r.cpu_s)
    writes = local_platform.writes_since(bp.store, wm)
    share = len(writes) / n if n else 0
    steady = local_platform.steady_rate([t for _, t in writes])
    res = r.result or {}
    out: dict[str, Any] = {
        "images": n,
        "seconds": round(r.seconds, 3),
        "images_per_s": round(n / r.seconds, 2),
        "steady_per_s": None if steady is None or share == 0 else round(steady / share, 2),
        "with_faces": len(writes),
        "to_first_write_s": round(writes[0][1] - e0, 2) if writes else None,
        "cpu": cpu.shares(),
        "failed": res.get("failed_count"),
    }
    if r.returncode != 0 or (res.get("success_count", 0) + res.get("failed_count", 0)) != n or not writes:
        out["error"] = f"exit {r.returncode}, result {str(res)[:300]}, stderr {r.stderr_tail[-300:]}"
    return out


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    from ray import serve

    from totask_ray.embedded.seeds import write_sample_images

    n = args.tasks if args.tasks and args.bench == "inference" else (8 if args.smoke else 160)
    runs = 1 if args.smoke else args.runs
    if not ray_started:
        local_ray.start_ray(args.ray_cpus)
    serve_port = local_ray.start_serve_loopback()
    sdk_py, sdk_why = sdk_unavailable(args.smoke)
    runner = None
    if sdk_py is not None:  # the platform's server process attaches to this Ray as a second driver
        os.environ["TOTASK_PLATFORM_RAY_ADDRESS"] = local_ray.ray_address()
        os.environ["TOTASK_PLATFORM_SERVE_PORT"] = str(serve_port)
        runner = RUNNER
    import logging

    # Face-free images end as "empty inference result" task failures by design: keep their
    # per-task warnings out of the bench's output.
    logging.getLogger("totask_ray").setLevel(logging.ERROR)
    with local_platform.platform(plugin_runner=runner) as bp:
        sample = write_sample_images(bp.lp.media_dir)
        names = [IMAGE_CYCLE[i % len(IMAGE_CYCLE)] for i in range(n)]
        paths = [sample[k]["path"] for k in names]
        bodies = [(Path(bp.lp.media_dir) / p).read_bytes() for p in paths]
        images = [_decode(b) for b in bodies]
        project, _ids = _project(bp, paths)
        warm_project, _ = _project(bp, paths[:8])
        version = f"1.0.0-bench{int(time.time())}"
        cfg = _release_config(version)
        batch = int(cfg["actions"]["deployment"]["serve_options"]["batch"]["max_batch_size"])
        release = bp.store.create_plugin_release("faces", version, cfg)

        deploy_s = None
        if not args.smoke:  # smoke: the first timed run deploys the app
            t0 = time.perf_counter()
            warm = run_totask(bp, warm_project, 8, release, bp.tmp / "warm.jsonl")
            deploy_s = time.perf_counter() - t0
            tables.log(
                f"faces app deployed by a warm-up run of 8 images in {deploy_s:.1f} s ({warm.get('error', 'ok')})"
            )
        if sdk_py is not None and not args.smoke:
            t1 = time.perf_counter()
            warm_sdk = run_sdk(bp, sdk_py, warm_project, 8, release)
            tables.log(f"SDK warm-up run of 8 images (finds the app, records it RUNNING): {time.perf_counter() - t1:.1f} s "
                  f"({warm_sdk.get('error', 'ok')})")  # fmt: skip

        cores = os.cpu_count() or 1
        raw_threads, raw_all = f"raw {cores} threads", f"raw all cores ({cores} processes)"
        raw_pool = RawPool(bodies, cores)
        contenders = [
            ("raw 1 thread", lambda: run_raw(images, batch, 1)),
            (raw_threads, lambda: run_raw(images, batch, cores)),
            (raw_all, lambda: raw_pool.run(batch)),
            ("raw decode+detect 1 thread", lambda: run_raw(images, batch, 1, bodies)),
            ("totask-ray", lambda: run_totask(bp, project, n, release, bp.tmp / "report.jsonl")),
        ]
        if sdk_py is not None:
            contenders.append(("sdk", lambda: run_sdk(bp, sdk_py, project, n, release)))
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
        load = meters.LoadSampler().start()
        for r in range(runs):
            for name, fn in contenders:
                res = fn()
                results[name].append(res)
                tables.log(f"inference run {r + 1}/{runs} {name}: {res['images']} images in {res['seconds']:.1f} s, "
                      f"{res['images_per_s']:.1f}/s (steady {res['steady_per_s']}), cpu {meters.fmt_shares(res['cpu'])}"
                      + (f" ERROR {res['error']}" if "error" in res else ""))  # fmt: skip
        load.stop()
        raw_pool.close()
        with_faces = results["raw 1 thread"][0]["with_faces"]
        import contextlib

        with contextlib.suppress(Exception):
            serve.delete(f"faces@{version}")

    summary: dict[str, dict[str, Any]] = {}
    for name, rs in results.items():
        good = [x for x in rs if "error" not in x]
        summary[name] = {
            "images_per_s": tables.median([x["images_per_s"] for x in good]) if good else None,
            "steady_per_s": tables.median([x["steady_per_s"] for x in good if x["steady_per_s"]])
            if good
            else None,
            "seconds": tables.median([x["seconds"] for x in good]) if good else None,
            "cpu": {
                k: tables.median([x["cpu"].get(k, 0.0) for x in good])
                for k in sorted({k for x in rs for k in x["cpu"]})
            },
            "runs": [x["images_per_s"] for x in rs],
            "failed_runs": len(rs) - len(good),
        }
    if sdk_py is None:
        summary["sdk"] = {"images_per_s": None, "steady_per_s": None, "seconds": None, "cpu": {}, "runs": [],
                          "failed_runs": 0, "note": sdk_why or ""}  # fmt: skip
    raw1 = summary["raw 1 thread"]["images_per_s"]
    ours = summary["totask-ray"]
    rows = []
    for name, v in summary.items():
        rows.append([name, tables.fmt(n), tables.fmt(v["seconds"], 1), tables.fmt(v["images_per_s"], 1), tables.fmt(v["steady_per_s"], 1),
                     tables.fmt(tables.ratio(v["images_per_s"], raw1), 2), " ".join(f"{k} {x:.2f}" for k, x in v["cpu"].items()),
                     f"{v['failed_runs']}/{len(v['runs'])}" if v["runs"] else v.get("note", ""),
                     " ".join(tables.fmt(x, 1) for x in v["runs"])])  # fmt: skip
    tables.say(tables.table(
        ["contender", "images", "s", "images/s", "steady/s", "vs raw 1 thread", "CPU share (cores)", "failed runs", "runs images/s"],
        rows,
        f"Inference, faces app, {n} images ({with_faces} with a face found by the raw model), batches of {batch}, "
        f"medians of {runs} interleaved runs; deploy by the warm-up run: {tables.fmt(deploy_s, 1)} s",
    ))  # fmt: skip
    tables.say(load.text())
    lines = []
    for key, basis in (("images_per_s", "whole run"), ("steady_per_s", "steady state")):
        val = tables.ratio(ours[key], raw1)
        text, met = tables.target_line(f"totask-ray / raw 1 thread [{basis}]", val, ">=", 0.85, "x")
        lines.append({"target": "totask-ray / raw", "basis": key, "value": val, "met": met, "text": text})
        val2 = tables.ratio(ours[key], summary[raw_threads]["images_per_s"])
        lines.append(
            {"info": f"totask-ray / {raw_threads} [{basis}]: {tables.fmt(val2, 2)}{'x' if val2 else ''}"}
        )
    # every core: the faster of N threads and N processes, as measured in this run
    every = max((summary[k]["images_per_s"] or 0.0 for k in (raw_threads, raw_all)), default=0.0) or None
    for key, basis in (("images_per_s", "whole run"), ("steady_per_s", "steady state")):
        val = tables.ratio(ours[key], every)
        text, met = tables.target_line(f"totask-ray / raw on every core [{basis}]", val, ">=", 0.8, "x")
        lines.append({"target": "totask-ray / raw on every core", "basis": key, "value": val, "met": met,
                      "text": text + f" (raw on every core: {tables.fmt(every, 1)} images/s, the faster of "
                      f"{raw_threads} and {raw_all})"})  # fmt: skip
    for key, basis in (("images_per_s", "whole run"), ("steady_per_s", "steady state")):
        val = tables.ratio(ours[key], summary["sdk"][key])
        text, met = tables.target_line(f"totask-ray / sdk [{basis}]", val, ">=", 5.0, "x")
        lines.append({"target": "totask-ray / sdk", "basis": key, "value": val, "met": met,
                      "text": text + (f" -- {sdk_why}" if sdk_why else "")})  # fmt: skip
    for t in lines:
        tables.say("  " + t.get("text", t.get("info", "")))
    out = {"images": n, "batch": batch, "deploy_s": deploy_s, "load": load.summary(), "contenders": summary,
           "targets": lines, "machine": meters.machine_info()}  # fmt: skip
    tables.dump_json("inference", out)
    return out
