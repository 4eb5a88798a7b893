"""Text detection and recognition with RapidOCR (PP-OCR ONNX models) on onnxruntime.

``rapidocr==3.10.0`` ships its default models inside the wheel (``rapidocr/models``: PP-OCRv6 det and
rec "small", the v2.0 mobile direction classifier). Left to its defaults it resolves model files
through a download table and would fetch any that are missing, so this module points every stage at
the bundled files explicitly: nothing is fetched, and a broken install fails at start-up.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
SPEC = PreProcessorSpec(name="ocr", labels={0: "text"})
MODEL_FILES = {
    "Det": "PP-OCRv6_det_small.onnx",
    "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
    "Rec": "PP-OCRv6_rec_small.onnx",
}


def bundled_model_paths() -> dict[str, Path]:
    """The model files inside the installed rapidocr wheel; raises if any is missing."""
    import rapidocr

    root = Path(rapidocr.__file__).parent / "models"
    paths = {stage: root / name for stage, name in MODEL_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"rapidocr's bundled models are missing ({', '.join(missing)}); install rapidocr==3.10.0 "
            "from its wheel (weights are never downloaded at run time)"
        )
    return paths


def _bool(value: Any) -> bool:
    # bool("false") is True: accept real booleans and the usual spellings only.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"not a boolean: {value!r}")


class RapidOCRReader:
    """One detection per text line: polygon (4 corners), bbox, recognised ``text`` and its score.

    App-specific params (per call): ``text_score`` (RapidOCR drops lines below it, default 0.5),
    ``box_thresh`` and ``unclip_ratio`` (detector), ``use_cls`` (180-degree line classifier).
    """

    def __init__(self, *, threads: int = 1, limit_side_len: int = 960, use_cls: bool = True) -> None:
        from rapidocr import RapidOCR

        paths = bundled_model_paths()
        # Det.limit_type "max" caps the longest side; RapidOCR's default ("min", 736) upsamples small
        # images ~4x and is 10x slower on documents-sized inputs with no gain in accuracy here.
        self._engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.use_cls": use_cls,
                "Det.model_path": str(paths["Det"]),
                "Cls.model_path": str(paths["Cls"]),
                "Rec.model_path": str(paths["Rec"]),
                "Det.limit_type": "max",
                "Det.limit_side_len": limit_side_len,
                "EngineConfig.onnxruntime.intra_op_num_threads": max(1, threads),
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        # RapidOCR keeps per-call options on the engine: pass every one on every call.
        self.defaults = {"text_score": 0.5, "box_thresh": 0.5, "unclip_ratio": 1.6, "use_cls": use_cls}
        self._load_models()

    def _load_models(self) -> None:
        # Load the three sessions now (RapidOCR loads them lazily on first use) so that a broken model
        # fails the deployment at start-up, not the first request.
        for loader in ("_load_det_model", "_load_cls_model", "_load_rec_model"):
            fn = getattr(self._engine, loader, None)
            if fn is not None:
                fn()

    @property
    def spec(self) -> PreProcessorSpec:
        return SPEC

    def _options(self, params: InferenceParams) -> dict[str, Any]:
        opts = dict(self.defaults)
        for key, cast in (
            ("text_score", float),
            ("box_thresh", float),
            ("unclip_ratio", float),
            ("use_cls", _bool),
        ):
            if key in params.extras:
                try:
                    opts[key] = cast(params.extras[key])
                except (TypeError, ValueError) as exc:
                    raise ValueError(
                        f"param {key!r} must be a {cast.__name__.strip('_')}, got {params.extras[key]!r}"
                    ) from exc
        return opts

    def read_one(self, image: np.ndarray, params: InferenceParams) -> list[Detection]:
        height, width = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # RapidOCR reads 3-channel arrays as BGR
        out = self._engine(bgr, **self._options(params))
        if out.boxes is None or out.txts is None or out.scores is None:
            return []
        dets = []
        for box, text, score in zip(out.boxes, out.txts, out.scores, strict=True):
            pts = np.asarray(box, dtype=float).reshape(-1, 2)
            pts[:, 0] = pts[:, 0].clip(0, width)
            pts[:, 1] = pts[:, 1].clip(0, height)
            bbox = clip_box(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max(), width, height)
            if bbox[2] <= 0 or bbox[3] <= 0 or not text:
                continue
            dets.append(
                Detection(
                    label="text",
                    class_id=0,
                    score=float(min(1.0, max(0.0, score))),
                    bbox=bbox,
                    polygon=[(float(x), float(y)) for x, y in pts],
                    text=str(text),
                )
            )
        return apply_params(dets, params)

    def detect(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]:
        return [self.read_one(img, params) for img in validate_images(images)]


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


@serve.deployment(name="TextReader")
class TextReaderDeployment:
    """One replica = one OCR engine; its onnxruntime threads match the replica's reserved CPUs."""

    def __init__(
        self,
        max_batch_size: int = 4,
        batch_wait_timeout_s: float = 0.01,
        options: dict[str, Any] | None = None,
    ) -> None:
        import httpx
        import ray

        opts = dict(options or {})
        self.max_image_bytes = int(opts.pop("max_image_bytes", MAX_IMAGE_BYTES))
        timeout_s = float(opts.pop("download_timeout_s", 30.0))
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        opts.setdefault("threads", max(1, round(cpus)))
        self.model = RapidOCRReader(**opts)
        self.max_batch_size = max_batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocr")
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
        """The batch entry point for handles: one list of text-line dicts per image."""
        p = InferenceParams.model_validate(params or {})
        return detections_to_dicts(await self._run(validate_images(images), p))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
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
    return TextReaderDeployment.options(**parsed.deployment_options()).bind(
        max_batch_size=parsed.max_batch_size,
        batch_wait_timeout_s=parsed.batch_wait_timeout_s,
        options=parsed.options,
    )
