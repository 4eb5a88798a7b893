"""Face detection with OpenCV's Haar cascade, as a pre-processor and as a Ray Serve application.

The cascade XML ships inside ``opencv-python-headless`` (``cv2.data.haarcascades``), so nothing is
downloaded. ``HaarFaceDetector`` is plain Python that needs no Ray cluster (benchmarks and plugin
hooks call it in-process); ``FaceDetectorDeployment`` wraps it for Ray Serve with one batch entry
point for handles (``predict``) and a Synapse-style HTTP route (``{"image_path": url, ...params}``).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from totask_ray.serving.interface import (
    Detection,
    InferenceParams,
    PreProcessorSpec,
    apply_params,
    clip_box,
    detections_to_dicts,
    validate_images,
    validate_output,
)

CONFIG_PATH = Path(__file__).with_name("config.yaml")
CASCADE = "haarcascade_frontalface_default.xml"
SPEC = PreProcessorSpec(name="faces", labels={0: "face"})


class HaarFaceDetector:
    """Frontal faces. App-specific params: ``scale_factor``, ``min_neighbors``, ``min_size`` (px),
    ``max_side`` (images are shrunk to this longest side before detection; boxes are mapped back).

    The score squashes the cascade's last-stage weight through a logistic. It is monotone in the
    detector's confidence (true faces land near 0.95+, typical false positives below 0.5) but it is
    not a calibrated probability.
    """

    def __init__(
        self,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 24,
        max_side: int = 1024,
        weight_midpoint: float = 2.5,
        weight_scale: float = 1.25,
    ) -> None:
        path = os.path.join(cv2.data.haarcascades, CASCADE)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"could not load the Haar cascade {path}; reinstall opencv-python-headless<5")
        self.defaults = {
            "scale_factor": scale_factor,
            "min_neighbors": min_neighbors,
            "min_size": min_size,
            "max_side": max_side,
        }
        self._mid = weight_midpoint
        self._scale = weight_scale

    @property
    def spec(self) -> PreProcessorSpec:
        return SPEC

    def _options(self, params: InferenceParams) -> dict[str, Any]:
        opts = dict(self.defaults)
        for key, cast in (
            ("scale_factor", float),
            ("min_neighbors", int),
            ("min_size", int),
            ("max_side", int),
        ):
            if key in params.extras:
                try:
                    opts[key] = cast(params.extras[key])
                except (TypeError, ValueError) as exc:
                    raise ValueError(
                        f"param {key!r} must be a {cast.__name__}, got {params.extras[key]!r}"
                    ) from exc
        if opts["scale_factor"] <= 1.0:
            raise ValueError(f"param 'scale_factor' must be > 1, got {opts['scale_factor']}")
        return opts

    def _score(self, weight: float) -> float:
        return 1.0 / (1.0 + math.exp(-(weight - self._mid) / self._scale))

    def detect_one(self, image: np.ndarray, params: InferenceParams) -> list[Detection]:
        opts = self._options(params)
        height, width = image.shape[:2]
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        factor = min(1.0, opts["max_side"] / max(height, width))
        if factor < 1.0:
            gray = cv2.resize(
                gray, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_AREA
            )
        gray = cv2.equalizeHist(gray)
        min_px = max(1, round(opts["min_size"] * factor))
        rects, _levels, weights = self._cascade.detectMultiScale3(
            gray,
            scaleFactor=opts["scale_factor"],
            minNeighbors=opts["min_neighbors"],
            minSize=(min_px, min_px),
            outputRejectLevels=True,
        )
        dets = []
        for (x, y, w, h), weight in zip(
            np.asarray(rects).reshape(-1, 4), np.asarray(weights).ravel(), strict=True
        ):
            box = clip_box(x / factor, y / factor, (x + w) / factor, (y + h) / factor, width, height)
            if box[2] <= 0 or box[3] <= 0:
                continue
            dets.append(Detection(label="face", class_id=0, score=self._score(float(weight)), bbox=box))
        return apply_params(dets, params)

    def detect(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]:
        return [self.detect_one(img, params) for img in validate_images(images)]


# ---------------------------------------------------------------------------------------------------
# Ray Serve
# ---------------------------------------------------------------------------------------------------

MAX_IMAGE_BYTES = 32 * 1024 * 1024


async def fetch_image(client: Any, url: str, max_bytes: int) -> np.ndarray:
    """Download and decode an image (http/https only, at most ``max_bytes``) to HxWx3 uint8 RGB."""
    from PIL import Image

    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise ValueError("image_path must be an http:// or https:// URL")
    data = bytearray()
    async with client.stream("GET", url) as resp:
        resp.raise_for_status()
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise ValueError(f"image is larger than the {max_bytes} byte limit")
        async for chunk in resp.aiter_bytes():
            data.extend(chunk)
            if len(data) > max_bytes:
                raise ValueError(f"image is larger than the {max_bytes} byte limit")
    with Image.open(io.BytesIO(bytes(data))) as img:
        return np.asarray(img.convert("RGB"))


@serve.deployment(name="FaceDetector")
class FaceDetectorDeployment:
    """One replica = one detector; model calls run one at a time on a worker thread."""

    def __init__(
        self,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        options: dict[str, Any] | None = None,
    ) -> None:
        import httpx
        import ray

        opts = dict(options or {})
        self.max_image_bytes = int(opts.pop("max_image_bytes", MAX_IMAGE_BYTES))
        timeout_s = float(opts.pop("download_timeout_s", 30.0))
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        cv2.setNumThreads(max(1, round(cpus)))
        self.model = HaarFaceDetector(**opts)
        self.max_batch_size = max_batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faces")
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=True)
        self._http_batch.set_max_batch_size(max_batch_size)
        self._http_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _run(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]:
        loop = asyncio.get_running_loop()
        out: list[list[Detection]] = []
        for i in range(0, len(images), self.max_batch_size):
            chunk = images[i : i + self.max_batch_size]
            dets = await loop.run_in_executor(self._pool, self.model.detect, chunk, params)
            out.extend(validate_output(chunk, dets, labels=SPEC.labels))
        return out

    async def predict(
        self, images: list[np.ndarray], params: dict[str, Any] | None = None
    ) -> list[list[dict]]:
        """The batch entry point for handles: one list of detection dicts per image."""
        p = InferenceParams.model_validate(params or {})
        return detections_to_dicts(await self._run(validate_images(images), p))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _http_batch(self, items: list[tuple[np.ndarray, str]]) -> list[list[dict]]:
        # Requests batched together may carry different params: run each group once.
        results: list[list[dict] | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for idx, (_, key) in enumerate(items):
            groups.setdefault(key, []).append(idx)
        for key, idxs in groups.items():
            dets = await self._run(
                [items[i][0] for i in idxs], InferenceParams.model_validate(json.loads(key))
            )
            for i, d in zip(idxs, detections_to_dicts(dets), strict=True):
                results[i] = d
        return [r or [] for r in results]

    async def __call__(self, request: Request) -> Any:
        """Synapse-style: ``{"image_path": url, ...params}`` -> ``{"detections": [...]}``."""
        try:
            body = await request.json()
            if not isinstance(body, dict) or "image_path" not in body:
                raise ValueError('expected a JSON object {"image_path": url, ...params}')
            params = {k: v for k, v in body.items() if k != "image_path"}
            InferenceParams.model_validate(params)
            image = await fetch_image(self._http, body["image_path"], self.max_image_bytes)
        except Exception as exc:
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"[:500]}, status_code=400)
        dets = await self._http_batch((image, json.dumps(params, sort_keys=True)))
        return {"detections": dets}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve app builder; ``args`` as made by ``totask_ray.serving.resources.deployment_args``.

    With no args, the resources and batching declared in this app's ``config.yaml`` are used.
    """
    from totask_ray.serving.config import load_release_config
    from totask_ray.serving.resources import DeploymentArgs, deployment_args

    parsed = (
        DeploymentArgs.model_validate(args) if args else deployment_args(load_release_config(CONFIG_PATH))
    )
    return FaceDetectorDeployment.options(**parsed.deployment_options()).bind(
        max_batch_size=parsed.max_batch_size,
        batch_wait_timeout_s=parsed.batch_wait_timeout_s,
        options=parsed.options,
    )
