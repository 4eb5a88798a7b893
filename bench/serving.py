"""Pre-processors on Ray Serve: deploy-to-RUNNING time and images/s, raw model vs Serve handle.

    python -m bench.serving [--runs 3] [--faces-images 64] [--ocr-images 16] [--json]

Starts its own local Ray (4 logical CPUs, no dashboard) with Serve on a loopback port. The raw model
runs in this process with the same thread count a 1-CPU replica gets (1), so "handle / raw" is the
cost of Serve itself (serialisation, routing, the replica's event loop), not of different threading.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(app: str, n: int) -> list[Any]:
    import numpy as np

    if app == "faces":
        from skimage import data

        return [data.astronaut()] * n
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (640, 220), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=48)
    draw.text((20, 30), "HELLO RAY SERVE", fill="black", font=font)
    draw.text((20, 130), "totask 2025", fill="black", font=font)
    return [np.asarray(img)] * n


def _raw_model(app: str) -> Any:
    if app == "faces":
        import cv2

        from serve_apps.faces.app import HaarFaceDetector

        cv2.setNumThreads(1)
        return HaarFaceDetector()
    from serve_apps.ocr.app import RapidOCRReader

    return RapidOCRReader(threads=1)


def bench_app(app: str, n_images: int, runs: int) -> dict[str, Any]:
    from ray import serve

    from totask_ray.serving.config import PreProcessorRelease, load_release_config
    from totask_ray.serving.lifecycle import RayServeBackend, ensure_running, teardown
    from totask_ray.serving.params import InferenceParams
    from totask_ray.serving.resources import deployment_args

    release = PreProcessorRelease.from_config(load_release_config(ROOT / "serve_apps" / app))
    batch = deployment_args(release.config).max_batch_size
    backend = RayServeBackend(delete_timeout_s=60)
    images = _images(app, n_images)

    deploy_s = []
    for _ in range(runs):
        result = ensure_running(release, backend, poll_interval_s=0.05, timeout_s=300)
        deploy_s.append(result.elapsed_s)
        if len(deploy_s) < runs:
            teardown(result, backend)

    handle = serve.get_app_handle(release.app_name)
    handle.predict.remote(images[:1], {}).result(timeout_s=120)  # warm the replica and the route
    t0 = time.perf_counter()
    for i in range(0, n_images, batch):
        handle.predict.remote(images[i : i + batch], {}).result(timeout_s=300)
    handle_seq = n_images / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    pending = [handle.predict.remote(images[i : i + batch], {}) for i in range(0, n_images, batch)]
    for resp in pending:
        resp.result(timeout_s=300)
    handle_conc = n_images / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for img in images[: max(4, n_images // 4)]:
        handle.predict.remote([img], {}).result(timeout_s=120)
    handle_single = max(4, n_images // 4) / (time.perf_counter() - t0)
    teardown(result, backend)

    model = _raw_model(app)
    params = InferenceParams()
    model.detect(images[:1], params)
    t0 = time.perf_counter()
    for i in range(0, n_images, batch):
        model.detect(images[i : i + batch], params)
    raw = n_images / (time.perf_counter() - t0)

    return {
        "app": release.app_name,
        "batch": batch,
        "images": n_images,
        "deploy_to_running_s": [round(s, 2) for s in deploy_s],
        "deploy_to_running_median_s": round(statistics.median(deploy_s), 2),
        "raw_images_per_s": round(raw, 2),
        "handle_batched_seq_images_per_s": round(handle_seq, 2),
        "handle_batched_concurrent_images_per_s": round(handle_conc, 2),
        "handle_one_image_per_call_images_per_s": round(handle_single, 2),
        "handle_vs_raw": round(handle_seq / raw, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faces-images", type=int, default=64)
    parser.add_argument("--ocr-images", type=int, default=16)
    parser.add_argument("--apps", default="faces,ocr")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    startup = time.perf_counter() - t0
    results = []
    try:
        for app in args.apps.split(","):
            n = args.faces_images if app == "faces" else args.ocr_images
            results.append(bench_app(app, n, args.runs))
    finally:
        ray.shutdown()

    if args.json:
        print(json.dumps({"ray_and_serve_start_s": round(startup, 2), "apps": results}, indent=2))
        return 0
    print(f"ray.init + serve.start: {startup:.1f} s (not included below)")
    cols = [
        ("app", "app"),
        ("deploy->RUNNING median s", "deploy_to_running_median_s"),
        ("runs s", "deploy_to_running_s"),
        ("raw img/s", "raw_images_per_s"),
        ("handle batched img/s", "handle_batched_seq_images_per_s"),
        ("handle concurrent img/s", "handle_batched_concurrent_images_per_s"),
        ("handle 1/call img/s", "handle_one_image_per_call_images_per_s"),
        ("handle/raw", "handle_vs_raw"),
    ]
    print(" | ".join(c for c, _ in cols))
    for r in results:
        print(" | ".join(str(r[k]) for _, k in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
