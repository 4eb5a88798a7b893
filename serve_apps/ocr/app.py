"""Text detection and recognition with RapidOCR (PP-OCR ONNX models) on onnxruntime.

``rapidocr==3.10.0`` ships its default models inside the wheel (``rapidocr/models``: PP-OCRv6 det and
rec "small", the v2.0 mobile direction classifier). Left to its defaults it resolves model files
through a download table and would fetch any that are missing, so this module points every stage at
the bundled files explicitly: nothing is fetched, and a broken install fails at start-up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from totask_ray.serving.deployment import app_params, build_application
from totask_ray.serving.interface import (
    Detection,
    InferenceParams,
    PreProcessorSpec,
    apply_params,
    clip_box,
    validate_images,
)

CONFIG_PATH = Path(__file__).with_name("config.yaml")
SPEC = PreProcessorSpec(name="ocr", labels={0: "text"})
MODEL_FILES = {
    "Det": "PP-OCRv6_det_small.onnx",
    "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
    "Rec": "PP-OCRv6_rec_small.onnx",
}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve app (``config.yaml``'s entrypoint): the shared pre-processor deployment around
    :class:`RapidOCRReader`, deployed as ``TextReader``."""
    return build_application(RapidOCRReader, CONFIG_PATH, args, name="TextReader")


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


PARAM_TYPES = {"text_score": float, "box_thresh": float, "unclip_ratio": float, "use_cls": _bool}


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
        return app_params(params, self.defaults, PARAM_TYPES)

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
