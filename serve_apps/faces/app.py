"""Face detection with OpenCV's Haar cascade, as a pre-processor and as a Ray Serve application.

The cascade XML ships inside ``opencv-python-headless`` (``cv2.data.haarcascades``), so nothing is
downloaded. ``HaarFaceDetector`` is plain Python that needs no Ray cluster (benchmarks and plugin
hooks call it in-process); ``build_app`` puts it behind the deployment every app shares
(``totask_ray.serving.deployment``: ``predict`` for handles, the Synapse-style HTTP route and its
policy-checked image fetch).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field
from ray import serve

from totask_ray.serving.deployment import build_application
from totask_ray.serving.interface import Detection, PreProcessorSpec
from totask_ray.serving.params import CommonParams, InferenceParams
from totask_ray.serving.params_check import app_options
from totask_ray.serving.postprocess import apply_params, clip_box
from totask_ray.serving.validation import validate_images

CONFIG_PATH = Path(__file__).with_name("config.yaml")
CASCADE = "haarcascade_frontalface_default.xml"


class FaceParams(CommonParams):
    """The face detector's own ``pre_processor_params``; unset keys keep the replica's defaults."""

    scale_factor: float | None = Field(
        None, gt=1.0, allow_inf_nan=False, description="a number > 1 (the image pyramid's step, e.g. 1.1)"
    )
    min_neighbors: int | None = Field(None, ge=0, description="an integer >= 0")
    min_size: int | None = Field(None, ge=1, description="an integer >= 1 (pixels of the original image)")
    max_side: int | None = Field(None, ge=32, description="an integer >= 32 (pixels)")


# OpenCV's cascade runs on the CPU only: `device: cuda` is refused rather than quietly ignored.
SPEC = PreProcessorSpec(name="faces", labels={0: "face"}, params=FaceParams, devices=("cpu",))


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve app (``config.yaml``'s entrypoint): the shared pre-processor deployment around
    :class:`HaarFaceDetector`, deployed as ``FaceDetector``."""
    return build_application(HaarFaceDetector, CONFIG_PATH, args, name="FaceDetector")


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
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            # Process-wide: a replica passes its reserved CPUs (OpenCV would size its pool from the
            # node's cores); in-process callers leave OpenCV's setting alone.
            cv2.setNumThreads(max(1, threads))
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
        # The same limits as per call: a bad constructor option fails the deployment, not a request.
        FaceParams.model_validate(self.defaults)
        self._mid = weight_midpoint
        self._scale = weight_scale

    @property
    def spec(self) -> PreProcessorSpec:
        return SPEC

    def _options(self, params: InferenceParams) -> dict[str, Any]:
        return {**self.defaults, **app_options(params, FaceParams)}

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
