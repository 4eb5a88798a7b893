"""Checks on what goes into a pre-processor and what comes out of it.

Everything a model returns is checked here (``validate_output``) before it can reach a task, so a
model that emits a box outside its image or a NaN score fails loudly with the image and item at fault
instead of writing garbage into a labeling platform. ``validate_images`` refuses inputs a model would
silently misread. The rules checked are the contract's (:mod:`totask_ray.serving.interface`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from totask_ray.serving.interface import Detection, PreProcessorInputError, PreProcessorOutputError

__all__ = ["BBOX_TOLERANCE_PX", "validate_images", "validate_output"]

# Models round and rescale coordinates: a box edge may land a fraction of a pixel past the border.
BBOX_TOLERANCE_PX = 1.0


def validate_images(images: Sequence[Any]) -> list[np.ndarray]:
    """Reject inputs a model would silently misread (grayscale, RGBA, float images)."""
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise PreProcessorInputError(f"images must be a list of arrays, got {type(images).__name__}")
    out: list[np.ndarray] = []
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise PreProcessorInputError(f"image {i}: expected a numpy array, got {type(img).__name__}")
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise PreProcessorInputError(
                f"image {i}: expected an HxWx3 uint8 RGB array, got shape {img.shape} dtype {img.dtype}"
            )
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise PreProcessorInputError(f"image {i}: empty image of shape {img.shape}")
        out.append(img)
    return out


def _image_size(img: Any) -> tuple[int, int]:
    """(height, width) of an image array or of anything with a ``shape``."""
    shape = getattr(img, "shape", None)
    if shape is None or len(shape) < 2:
        raise PreProcessorOutputError(f"cannot read the size of an input of type {type(img).__name__}")
    return int(shape[0]), int(shape[1])


def _error_field(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(item)"
    return f"field '{loc}': {first['msg']}"


def validate_output(
    images: Sequence[Any],
    raw_output: Any,
    *,
    labels: Mapping[int, str] | None = None,
) -> list[list[Detection]]:
    """Check what a model returned for ``images`` and return it as :class:`Detection` objects.

    Raises :class:`PreProcessorOutputError` naming the image index, item index and field at fault.
    ``labels`` (``spec.labels``), when given, also checks every ``class_id``/``label`` pair.
    """
    if not isinstance(raw_output, (list, tuple)):
        raise PreProcessorOutputError(
            f"expected a list with one list of detections per image, got {type(raw_output).__name__}"
        )
    if len(raw_output) != len(images):
        raise PreProcessorOutputError(
            f"expected one list of detections per image: {len(images)} images, {len(raw_output)} lists"
        )
    result: list[list[Detection]] = []
    for i, (img, items) in enumerate(zip(images, raw_output, strict=True)):
        height, width = _image_size(img)
        if not isinstance(items, (list, tuple)):
            raise PreProcessorOutputError(
                f"image {i}: expected a list of detections, got {type(items).__name__}"
            )
        dets: list[Detection] = []
        for j, item in enumerate(items):
            where = f"image {i}, detection {j}"
            try:
                if isinstance(item, Detection):
                    det = Detection.model_validate(item.model_dump())
                elif isinstance(item, Mapping):
                    det = Detection.model_validate(dict(item))
                else:
                    raise PreProcessorOutputError(
                        f"{where}: expected a Detection or a mapping, got {type(item).__name__}"
                    )
            except ValidationError as exc:
                raise PreProcessorOutputError(f"{where}, {_error_field(exc)}") from exc
            _check_inside(det, width, height, where)
            if labels is not None:
                expected = labels.get(det.class_id)
                if expected is None:
                    raise PreProcessorOutputError(
                        f"{where}, field 'class_id': {det.class_id} is not one of the spec's labels "
                        f"{sorted(labels)}"
                    )
                if expected != det.label:
                    raise PreProcessorOutputError(
                        f"{where}, field 'label': {det.label!r} does not match class_id {det.class_id} "
                        f"({expected!r})"
                    )
            dets.append(det)
        result.append(dets)
    return result


def _check_inside(det: Detection, width: int, height: int, where: str) -> None:
    tol = BBOX_TOLERANCE_PX
    x, y, w, h = det.bbox
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise PreProcessorOutputError(
            f"{where}, field 'bbox': [x, y, width, height] = {[round(v, 2) for v in det.bbox]} "
            f"extends outside the {width}x{height} image"
        )
    for k, (px, py) in enumerate(det.polygon or ()):
        if not (-tol <= px <= width + tol and -tol <= py <= height + tol):
            raise PreProcessorOutputError(
                f"{where}, field 'polygon.{k}': point [{px:.2f}, {py:.2f}] is outside the "
                f"{width}x{height} image"
            )
