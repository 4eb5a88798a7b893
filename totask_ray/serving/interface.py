"""The contract between a pre-processor and everything that calls it.

In the spirit of CVAT's ``cvat_sdk/auto_annotation/interface.py``: a pre-processor names the labels it
can emit (``spec``) and turns a batch of decoded images into detections (``detect``). Everything a
model returns is checked here (``validate_output``) before it can reach a task, so a model that emits
a box outside its image or a NaN score fails loudly with the image and item at fault instead of
writing garbage into a labeling platform.

This module imports neither Ray nor any model, so a plugin author (or a benchmark) can run a
pre-processor in one plain Python process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "BBOX_TOLERANCE_PX",
    "Detection",
    "InferenceParams",
    "PreProcessor",
    "PreProcessorInputError",
    "PreProcessorOutputError",
    "PreProcessorSpec",
    "apply_params",
    "clip_box",
    "detections_to_dicts",
    "validate_images",
    "validate_output",
]

# Models round and rescale coordinates: a box edge may land a fraction of a pixel past the border.
BBOX_TOLERANCE_PX = 1.0

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Point = tuple[FiniteFloat, FiniteFloat]


class Detection(BaseModel):
    """One object found in one image; coordinates are pixels of the image the model was given."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1)
    class_id: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    bbox: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat]
    polygon: list[Point] | None = None
    text: str | None = None

    @field_validator("bbox")
    @classmethod
    def _positive_size(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        # A zero-area box cannot be drawn or edited by an annotator.
        if v[2] <= 0 or v[3] <= 0:
            raise ValueError(f"width and height must be > 0, got [x, y, width, height] = {list(v)}")
        return v

    @field_validator("polygon")
    @classmethod
    def _enough_points(cls, v: list[Point] | None) -> list[Point] | None:
        if v is not None and len(v) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(v)}")
        return v


class InferenceParams(BaseModel):
    """Per-call options. Unknown keys are kept and passed through for the app's own options.

    ``threshold`` is accepted for ``confidence_threshold`` because that is the key Synapse's
    inference call sends (``{"image_path": ..., "threshold": 0.5}``).
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    confidence_threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("confidence_threshold", "threshold"),
    )
    class_filter: list[int | str] | None = None
    max_objects: int | None = Field(None, ge=1)
    min_object_size: float | None = Field(None, ge=0.0, allow_inf_nan=False)

    @property
    def extras(self) -> dict[str, Any]:
        """The app-specific keys, e.g. ``{"min_neighbors": 3}`` for the face detector."""
        return dict(self.model_extra or {})


class PreProcessorSpec(BaseModel):
    """What a pre-processor is and which labels it can emit (``class_id -> label``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    labels: dict[int, str]


class PreProcessorOutputError(ValueError):
    """A model returned something that is not a valid list of detections per image."""


class PreProcessorInputError(ValueError):
    """An image handed to a pre-processor is not HxWx3 uint8 RGB."""


@runtime_checkable
class PreProcessor(Protocol):
    """A model that pre-annotates images.

    ``detect(images, params)`` receives a batch of HxWx3 ``uint8`` RGB arrays and must return:

    - a list with exactly one entry per input image, in input order;
    - each entry a list (possibly empty) of :class:`Detection`;
    - ``bbox`` as ``[x, y, width, height]`` in pixels of that input image, ``width`` and ``height``
      > 0, the box inside the image (up to :data:`BBOX_TOLERANCE_PX` of rounding);
    - ``polygon`` (optional) with at least 3 ``[x, y]`` points, also inside the image;
    - ``score`` a finite float in ``[0, 1]`` (higher is more confident);
    - ``class_id``/``label`` a pair from ``spec.labels``;
    - ``params`` honoured: :func:`apply_params` implements the common keys; extra keys are the
      app's own options.

    Implementations must be usable without Ray (so they can be benchmarked in one process) and must
    not download anything at run time: weights come from installed packages.
    """

    @property
    def spec(self) -> PreProcessorSpec: ...

    def detect(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]: ...


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


def apply_params(detections: Sequence[Detection], params: InferenceParams) -> list[Detection]:
    """Apply the common params to one image's detections; scores are kept as they are.

    ``max_objects`` keeps the highest-scoring items but returns them in their original order, because
    for some models (OCR lines) the order carries meaning.
    """
    kept = [d for d in detections if d.score >= params.confidence_threshold]
    if params.class_filter is not None:
        wanted_ids = {c for c in params.class_filter if isinstance(c, int)}
        wanted_labels = {c for c in params.class_filter if isinstance(c, str)}
        kept = [d for d in kept if d.class_id in wanted_ids or d.label in wanted_labels]
    if params.min_object_size is not None:
        kept = [d for d in kept if min(d.bbox[2], d.bbox[3]) >= params.min_object_size]
    if params.max_objects is not None and len(kept) > params.max_objects:
        ranked = sorted(range(len(kept)), key=lambda k: kept[k].score, reverse=True)
        chosen = set(ranked[: params.max_objects])
        kept = [d for k, d in enumerate(kept) if k in chosen]
    return kept


def detections_to_dicts(batch: Sequence[Sequence[Detection]]) -> list[list[dict[str, Any]]]:
    """JSON-ready form (lists, no tuples, no ``None`` keys dropped) for handles and HTTP answers."""
    return [[d.model_dump(mode="json") for d in per_image] for per_image in batch]


def clip_box(
    x0: float, y0: float, x1: float, y1: float, width: int, height: int
) -> tuple[float, float, float, float]:
    """Corners to an ``[x, y, w, h]`` box clipped to the image; helper for model wrappers."""
    x0, x1 = max(0.0, min(x0, x1)), min(float(width), max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(float(height), max(y0, y1))
    return (x0, y0, x1 - x0, y1 - y0)
