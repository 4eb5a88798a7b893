"""Text detection and recognition with RapidOCR (PP-OCR ONNX models) on onnxruntime.

``rapidocr==3.10.0`` ships its default models inside the wheel (``rapidocr/models``: PP-OCRv6 det and
rec "small", the v2.0 mobile direction classifier). Left to its defaults it resolves model files
through a download table and would fetch any that are missing, so this module points every stage at
the bundled files explicitly: nothing is fetched, and a broken install fails at start-up.

``model_config.device: cuda`` runs the models on onnxruntime's ``CUDAExecutionProvider`` where that
is offered (the ``gpu`` extra installs ``onnxruntime-gpu``; the replica must reserve a GPU), and on
the CPU otherwise. Each device gets its own engine, built on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from ray import serve

from totask_ray.serving.deployment import build_application
from totask_ray.serving.interface import Detection, PreProcessorSpec
from totask_ray.serving.params import CommonParams, InferenceParams
from totask_ray.serving.params_check import app_options
from totask_ray.serving.postprocess import apply_params, clip_box
from totask_ray.serving.validation import validate_images

log = logging.getLogger(__name__)
CONFIG_PATH = Path(__file__).with_name("config.yaml")
CUDA_EP = "CUDAExecutionProvider"


class OCRParams(CommonParams):
    """RapidOCR's own per-call options (what its ``__call__`` takes); unset keys keep the defaults."""

    text_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="a number from 0 to 1 (lines below it are dropped)",
    )
    box_thresh: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="a number from 0 to 1 (detector box score)"
    )
    unclip_ratio: float | None = Field(
        None, gt=0.0, allow_inf_nan=False, description="a number > 0 (how far a text box is grown)"
    )
    use_cls: bool | None = Field(None, description="true or false (the 180-degree line classifier)")


SPEC = PreProcessorSpec(name="ocr", labels={0: "text"}, params=OCRParams, devices=("cpu", "cuda"))
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


def cuda_available() -> bool:
    """Whether onnxruntime here offers the CUDA provider (``onnxruntime-gpu`` on a GPU build)."""
    import onnxruntime

    return CUDA_EP in onnxruntime.get_available_providers() and onnxruntime.get_device() == "GPU"


class RapidOCRReader:
    """One detection per text line: polygon (4 corners), bbox, recognised ``text`` and its score.

    App-specific params (per call, see :class:`OCRParams`): ``text_score`` (RapidOCR drops lines below
    it, default 0.5), ``box_thresh`` and ``unclip_ratio`` (detector), ``use_cls`` (180-degree line
    classifier). ``device`` is the default for calls that do not set ``model_config.device``.
    """

    def __init__(
        self,
        *,
        threads: int = 1,
        limit_side_len: int = 960,
        use_cls: bool = True,
        device: Literal["cpu", "cuda", "auto"] = "cpu",
    ) -> None:
        self._paths = bundled_model_paths()
        self._threads = max(1, threads)
        self._limit_side_len = limit_side_len
        self._use_cls = use_cls
        self.device = device
        self._cuda = cuda_available()
        self._warned_no_cuda = False
        self._engines: dict[str, Any] = {}
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        # RapidOCR keeps per-call options on the engine: pass every one on every call.
        self.defaults = {"text_score": 0.5, "box_thresh": 0.5, "unclip_ratio": 1.6, "use_cls": use_cls}
        self._engine(self.resolve_device(device))  # a broken model fails the deployment, not a call

    def resolve_device(self, requested: str | None) -> Literal["cpu", "cuda"]:
        """``cpu`` or ``cuda``: CUDA when asked for (or ``auto``) and offered, the CPU otherwise."""
        want = requested or self.device
        if want == "cpu":
            return "cpu"
        if self._cuda:
            return "cuda"
        if want == "cuda" and not self._warned_no_cuda:
            self._warned_no_cuda = True
            log.warning(
                "device cuda was asked for, but onnxruntime offers no %s here; running on CPU", CUDA_EP
            )
        return "cpu"

    def _engine(self, device: Literal["cpu", "cuda"]) -> Any:
        engine = self._engines.get(device)
        if engine is None:
            engine = self._engines[device] = self._build_engine(use_cuda=device == "cuda")
        return engine

    def _build_engine(self, *, use_cuda: bool) -> Any:
        from rapidocr import RapidOCR

        paths = self._paths
        # Det.limit_type "max" caps the longest side; RapidOCR's default ("min", 736) upsamples small
        # images ~4x and is 10x slower on documents-sized inputs with no gain in accuracy here.
        engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.use_cls": self._use_cls,
                "Det.model_path": str(paths["Det"]),
                "Cls.model_path": str(paths["Cls"]),
                "Rec.model_path": str(paths["Rec"]),
                "Det.limit_type": "max",
                "Det.limit_side_len": self._limit_side_len,
                "EngineConfig.onnxruntime.intra_op_num_threads": self._threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                # Ray sets CUDA_VISIBLE_DEVICES to the replica's own GPU, which is then device 0.
                "EngineConfig.onnxruntime.use_cuda": use_cuda,
                "EngineConfig.onnxruntime.cuda_ep_cfg.device_id": 0,
            }
        )
        self._load_models(engine)
        return engine

    def providers(self, device: str | None = None) -> list[str]:
        """The execution providers the detector's session runs on, best first (for checks and logs)."""
        engine = self._engine(self.resolve_device(device))
        session = getattr(getattr(engine.text_det, "session", None), "session", None)
        return list(session.get_providers()) if session is not None else []

    @staticmethod
    def _load_models(engine: Any) -> None:
        # Load the three sessions now (RapidOCR loads them lazily on first use) so that a broken model
        # fails at start-up, not on the first request.
        for loader in ("_load_det_model", "_load_cls_model", "_load_rec_model"):
            fn = getattr(engine, loader, None)
            if fn is not None:
                fn()

    @property
    def spec(self) -> PreProcessorSpec:
        return SPEC

    def _options(self, params: InferenceParams) -> dict[str, Any]:
        return {**self.defaults, **app_options(params, OCRParams)}

    def read_one(self, image: np.ndarray, params: InferenceParams) -> list[Detection]:
        height, width = image.shape[:2]
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # RapidOCR reads 3-channel arrays as BGR
        engine = self._engine(self.resolve_device(params.device))
        out = engine(bgr, **self._options(params))
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
