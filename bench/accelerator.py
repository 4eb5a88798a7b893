"""Inference at accelerator shape: `python -m bench accelerator [--tasks N] [--runs R]`.

The pre-processor (`bench/accel_app`) behaves like a model on a GPU: a batch costs 40 ms + 1 ms
per image, waited out without burning CPU, one batch at a time per replica, 1 logical GPU per
replica. It runs with N = 1, 2, 4 replicas on a local Ray with 4 logical GPUs, through
`run_to_task(method=inference)` on the embedded platform, on real images that the Data actors
download and decode. For each N: images/s (whole run, and within the replicas' busy span), each
replica's busy share, and images/s against N x one replica's best (max_batch / (40 ms + 1 ms x
max_batch)). A decode-only rate on every core says where CPU decoding bounds the run. The SDK's
per-task path (the app's own route through the platform's plugin runner) runs at N = 1 for the ratio.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench import environment, local_platform, local_ray, tables

APP_DIR = environment.ROOT / "bench" / "accel_app"
GPUS = 4
REPLICAS = (1, 2, 4)


def _decode(body: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(body)) as img:
        return int(img.convert("RGB").size[0])


def decode_rate(bodies: list[bytes]) -> float:
    """Images/s that every core decodes, with nothing else: the most the Data actors can feed."""
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_decode, bodies[: 2 * cores]))  # warm the workers
        t0 = time.perf_counter()
        list(pool.map(_decode, bodies, chunksize=8))
        return len(bodies) / (time.perf_counter() - t0)


def release_config(version: str, replicas: int, log_dir: Path) -> dict[str, Any]:
    from totask_ray.serving.config import load_release_config

    cfg = load_release_config(APP_DIR).model_dump(mode="json", exclude_none=True)
    cfg["version"] = version
    dep = cfg["actions"]["deployment"]
    dep["serve_options"]["num_replicas"] = replicas
    options = dep.setdefault("options", {})
    options["log_dir"] = str(log_dir)
    options["allowed_hosts"] = ["127.0.0.1"]  # the SDK path's route fetches from the platform
    return cfg


def busy(log_dir: Path) -> dict[str, Any]:
    """Per replica: busy seconds (batches are serial per replica) over the span of all replicas."""
    replicas = []
    for f in sorted(log_dir.glob("replica-*.jsonl")):
        calls = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if calls:
            replicas.append(calls)
    if not replicas:
        return {"replicas": 0}
    start = min(call["start"] for calls in replicas for call in calls)
    end = max(call["end"] for calls in replicas for call in calls)
    span = max(end - start, 1e-9)
    shares = [sum(call["end"] - call["start"] for call in calls) / span for calls in replicas]
    images = sum(call["n"] for calls in replicas for call in calls)
    batches = sum(len(calls) for calls in replicas)
    return {
        "replicas": len(replicas),
        "busy": [round(s, 3) for s in shares],
        "span_s": round(span, 3),
        "images_in_span_per_s": round(images / span, 1),
        "mean_batch": round(images / batches, 1),
    }


def main(args: Any, *, ray_started: bool = False) -> dict[str, Any]:
    import ray
    from ray import serve

    from bench import inference as inf
    from totask_ray.embedded.seeds import write_sample_images

    n = args.tasks if args.tasks and args.bench == "accelerator" else (48 if args.smoke else 480)
    runs = 1 if args.smoke else args.runs
    asked = getattr(args, "replicas", None)
    counts = tuple(int(x) for x in asked.split(",")) if asked else REPLICAS
    if args.smoke:
        counts = (1,)  # one deploy, no SDK, no warm-up run
    if ray_started:
        ray.shutdown()
    # As many logical CPUs as cores, as `ray start` gives a node: more would let the default plan
    # start one decode actor per half CPU (14 processes on 2 cores here, at half the images/s).
    cpus = getattr(args, "ray_cpus", None) or os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, num_gpus=GPUS, include_dashboard=False, configure_logging=False,
             log_to_driver=False, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})  # fmt: skip
    tables.say(f"local Ray with {cpus} logical CPUs and {GPUS} logical GPUs on {os.cpu_count()} cores")
    serve_port = local_ray.start_serve_loopback()
    if getattr(args, "no_sdk", False):
        sdk_py, sdk_why = None, "skipped (--no-sdk)"
    else:
        sdk_py, sdk_why = inf.sdk_unavailable(args.smoke)
    runner = None
    if sdk_py is not None:
        os.environ["TOTASK_PLATFORM_RAY_ADDRESS"] = local_ray.ray_address()
        os.environ["TOTASK_PLATFORM_SERVE_PORT"] = str(serve_port)
        runner = inf.RUNNER
    logs = Path(tempfile.mkdtemp(prefix="totask-accel-"))
    out: dict[str, Any] = {"images": n, "runs": runs, "rows": {}}
    try:
        with local_platform.platform(plugin_runner=runner) as bp:
            sample = write_sample_images(bp.lp.media_dir)
            names = [inf.IMAGE_CYCLE[i % len(inf.IMAGE_CYCLE)] for i in range(n)]
            paths = [sample[k]["path"] for k in names]
            bodies = [(Path(bp.lp.media_dir) / p).read_bytes() for p in paths]
            project, _ = inf._project(bp, paths)
            decode = decode_rate(bodies)
            one_best = 32 / (0.040 + 0.001 * 32)
            rows = []
            for replicas in counts:
                version = f"1.0.0-accel{replicas}-{int(time.time())}"
                log_dir = logs / f"n{replicas}"
                release = bp.store.create_plugin_release(
                    "accel", version, release_config(version, replicas, log_dir)
                )
                if not args.smoke:  # deploy and warm up outside the timed runs
                    inf.run_totask(bp, project, min(n, 32), release, bp.tmp / "warm.jsonl")
                per: list[dict[str, Any]] = []
                for _ in range(runs):
                    shutil.rmtree(log_dir, ignore_errors=True)
                    got = inf.run_totask(bp, project, n, release, bp.tmp / "report.jsonl")
                    got["busy"] = busy(log_dir)
                    per.append(got)
                    tables.log(
                        f"N={replicas}: {got['images_per_s']} images/s, busy {got['busy']}, first write {got.get('to_first_write_s')} s"
                    )
                sdk = None
                if sdk_py is not None and replicas == 1 and not args.smoke:
                    sdk = inf.run_sdk(bp, sdk_py, project, n, release)
                    tables.log(f"N=1 sdk: {sdk.get('images_per_s')} images/s {sdk.get('error', '')}")
                for app in list(serve.status().applications):
                    if app.startswith("accel"):
                        serve.delete(app)
                whole = tables.median([p["images_per_s"] for p in per])
                in_span = tables.median([p["busy"].get("images_in_span_per_s", 0) for p in per])
                shares = [s for p in per for s in p["busy"].get("busy", [])]
                target = replicas * one_best
                row = {
                    "replicas": replicas, "images_per_s": whole, "in_span_per_s": in_span,
                    "busy_min": min(shares) if shares else None, "busy_median": tables.median(shares) if shares else None,
                    "vs_n_best": round(in_span / target, 3), "mean_batch": per[-1]["busy"].get("mean_batch"),
                    "runs": [p["images_per_s"] for p in per], "errors": [p.get("error") for p in per if p.get("error")],
                    "sdk_images_per_s": sdk.get("images_per_s") if sdk else None,
                }  # fmt: skip
                out["rows"][replicas] = row
                rows.append([
                    replicas, tables.fmt(whole, 1), tables.fmt(in_span, 1), f"{tables.fmt(target, 0)}",
                    tables.fmt(row["vs_n_best"], 2), tables.fmt(row["busy_median"], 2), tables.fmt(row["busy_min"], 2),
                    row["mean_batch"], " ".join(tables.fmt(x, 1) for x in row["runs"]),
                ])  # fmt: skip
            tables.say(
                tables.table(
                    [
                        "replicas (1 GPU each)",
                        "images/s whole run",
                        "images/s in replicas' span",
                        "N x one best",
                        "vs N x best",
                        "busy median",
                        "busy min",
                        "mean batch",
                        "runs images/s",
                    ],
                    rows,
                    title=f"Accelerator-shaped pre-processor (40 ms + 1 ms/image), {n} images, medians of {runs}; "
                    f"decode-only on {os.cpu_count()} cores: {decode:.0f} images/s",
                )
            )
            first = out["rows"].get(1, {})
            if first.get("sdk_images_per_s"):
                tables.say(f"  totask-ray / sdk at N=1: {tables.fmt(tables.ratio(first['images_per_s'], first['sdk_images_per_s']), 2)}x "
                      "(target >= 5x)")  # fmt: skip
            else:
                tables.say(f"  totask-ray / sdk: n/a ({sdk_why or 'the SDK run failed'})")
            bound = next((r for r in counts if r * one_best > decode), None)
            tables.say(f"  CPU decoding bounds the run from N = {bound} (decode-only {decode:.0f} images/s against "
                  f"{one_best:.0f} images/s per replica)")  # fmt: skip
            out["decode_per_s"] = round(decode, 1)
            out["one_best"] = round(one_best, 1)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        ray.shutdown()
        if ray_started:
            local_ray.start_ray(getattr(args, "ray_cpus", None))
    tables.dump_json("accelerator", out)
    return out
