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

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

__all__ = [
    "BBOX_TOLERANCE_PX",
    "CheckedParams",
    "CommonParams",
    "Detection",
    "Device",
    "InferenceParams",
    "ModelSettings",
    "ParamsRefused",
    "PostProcessing",
    "PreProcessor",
    "PreProcessorInputError",
    "PreProcessorOutputError",
    "PreProcessorSpec",
    "app_options",
    "apply_params",
    "check_device",
    "check_params",
    "clip_box",
    "detections_to_dicts",
    "iou",
    "nms",
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


Device = Literal["cpu", "cuda", "auto"]


def _as_list(v: Any) -> Any:
    # `class_filter: face` in a form is as clear as `[face]`; a lone value should not be refused.
    return [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v


def _empty_if_none(v: Any) -> Any:
    # `model_config:` with nothing under it is YAML's null: the same as leaving the group out.
    return {} if v is None else v


ClassRef = Annotated[int, Strict(), Field(ge=0)] | Annotated[str, Strict(), Field(min_length=1)]


def _is_number(annotation: Any) -> bool:
    kinds = {annotation, *get_args(annotation)}
    return bool(kinds & {int, float}) and bool not in kinds


class _Params(BaseModel):
    """Params arrive as JSON or YAML, where ``yes`` is a boolean: ``max_objects: yes`` must not be 1."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("expected a number, not a boolean")
        return v


class ModelSettings(_Params):
    """``pre_processor_params.model_config``: how the app runs its model, not what it keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int | None = Field(None, ge=1, description="an integer >= 1 (images per model call)")
    device: Device | None = Field(None, description="cpu, cuda or auto")


class PostProcessing(_Params):
    """``pre_processor_params.post_processing``: the user guide puts ``nms_threshold`` here too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nms_threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="a number from 0 to 1 (an IoU)"
    )


class CommonParams(_Params):
    """The ``pre_processor_params`` every pre-processor understands; an app's params model extends it.

    Declared strictly (``extra="forbid"``) so that a model is a complete statement of what the app
    reads; :func:`check_params` takes unknown keys off first and reports them instead of failing.
    ``threshold`` is accepted for ``confidence_threshold`` because that is the key Synapse's own
    inference call sends (``{"image_path": ..., "threshold": 0.5}``).
    """

    model_config = ConfigDict(extra="forbid")

    confidence_threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("confidence_threshold", "threshold"),
        description="a number from 0 to 1",
    )
    nms_threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="a number from 0 to 1 (an IoU)"
    )
    class_filter: Annotated[list[ClassRef] | None, BeforeValidator(_as_list)] = Field(
        None, description="a list of the model's class names or ids"
    )
    max_objects: int | None = Field(None, ge=1, description="an integer >= 1")
    min_object_size: float | None = Field(
        None, ge=0.0, allow_inf_nan=False, description="a number of pixels >= 0"
    )
    # `model_config` is pydantic's own attribute: the field gets another name and the key as alias.
    model_settings: Annotated[ModelSettings, BeforeValidator(_empty_if_none)] = Field(
        default_factory=ModelSettings, alias="model_config", description="a mapping of batch_size, device"
    )
    post_processing: Annotated[PostProcessing, BeforeValidator(_empty_if_none)] = Field(
        default_factory=PostProcessing, description="a mapping of nms_threshold"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        # Pydantic would take the first alias it finds and keep the other as an extra: refuse instead.
        if not (isinstance(data, Mapping) and "threshold" in data and "confidence_threshold" in data):
            return data
        if data["threshold"] != data["confidence_threshold"]:
            raise ValueError(
                "confidence_threshold is given twice (confidence_threshold and threshold) with "
                "different values; give one"
            )
        return {k: v for k, v in data.items() if k != "threshold"}

    @model_validator(mode="after")
    def _one_nms(self) -> CommonParams:
        top, nested = self.nms_threshold, self.post_processing.nms_threshold
        if top is not None and nested is not None and top != nested:
            raise ValueError(
                f"nms_threshold is given twice with different values (nms_threshold={top}, "
                f"post_processing.nms_threshold={nested}); give one"
            )
        return self

    @property
    def iou_threshold(self) -> float | None:
        """The NMS threshold, from either of the two places a user may write it."""
        return self.nms_threshold if self.nms_threshold is not None else self.post_processing.nms_threshold

    @property
    def batch_size(self) -> int | None:
        return self.model_settings.batch_size

    @property
    def device(self) -> str | None:
        return self.model_settings.device


class _RuntimeModelSettings(ModelSettings):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _RuntimePostProcessing(PostProcessing):
    model_config = ConfigDict(extra="ignore", frozen=True)


class InferenceParams(CommonParams):
    """Per-call options as a replica receives them. Unknown keys are kept for the app's own options.

    Lenient where :class:`CommonParams` is strict: a caller that bypasses :func:`check_params` (an HTTP
    client, the platform) may send keys of another app (``model_config.use_fp16``); they must not turn
    into a 400. Values of the known keys are still checked.
    """

    model_config = ConfigDict(extra="allow")

    model_settings: Annotated[_RuntimeModelSettings, BeforeValidator(_empty_if_none)] = Field(
        default_factory=_RuntimeModelSettings, alias="model_config"
    )
    post_processing: Annotated[_RuntimePostProcessing, BeforeValidator(_empty_if_none)] = Field(
        default_factory=_RuntimePostProcessing
    )

    @property
    def extras(self) -> dict[str, Any]:
        """The app-specific keys, e.g. ``{"min_neighbors": 3}`` for the face detector."""
        return dict(self.model_extra or {})


class PreProcessorSpec(BaseModel):
    """What a pre-processor is, which labels it can emit (``class_id -> label``) and what it accepts.

    ``params`` (a :class:`CommonParams` subclass) declares the ``pre_processor_params`` the app reads;
    without it only the common keys are checked and everything else is passed through unreported.
    ``devices`` is where the model can run (``None``: not declared). ``honours_batch_size`` is true for
    every app on the shared deployment, which chunks model calls by ``model_config.batch_size``; an app
    that cannot sets it false, and the key is then refused rather than silently ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    labels: dict[int, str]
    params: type[CommonParams] | None = None
    # Where the model can run; "auto" is a request, not a place.
    devices: tuple[Literal["cpu", "cuda"], ...] | None = Field(None, min_length=1)
    honours_batch_size: bool = True

    @field_validator("params")
    @classmethod
    def _declared_strictly(cls, v: type[CommonParams] | None) -> type[CommonParams] | None:
        if v is None:
            return v
        if v.model_config.get("extra") != "forbid":
            raise ValueError(f"{v.__name__} must keep extra='forbid': it declares every key the app reads")
        required = [name for name, f in v.model_fields.items() if f.is_required()]
        if required:
            raise ValueError(
                f"{v.__name__}: every param is optional per call; give {', '.join(required)} a default"
            )
        return v


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
    - ``params`` honoured: :func:`apply_params` implements the common keys (NMS included); the
      shared deployment chunks model calls by ``model_config.batch_size``; ``model_config.device``
      is the app's to honour, within ``spec.devices``; extra keys are the app's own options,
      declared by ``spec.params``.

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


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x, y, width, height]`` boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def nms(detections: Sequence[Detection], iou_threshold: float) -> list[Detection]:
    """Class-wise greedy non-maximum suppression, in the detections' original order.

    Highest score first, a box is dropped when it overlaps a kept box of the same ``class_id`` by an
    IoU above ``iou_threshold`` (so 1.0 keeps everything). Classes never suppress each other: a face
    inside a person box is not a duplicate. Applying it twice changes nothing, so the app and the
    driver may both apply it.
    """
    order = sorted(range(len(detections)), key=lambda k: detections[k].score, reverse=True)
    kept_by_class: dict[int, list[Detection]] = {}
    keep: set[int] = set()
    for k in order:
        det = detections[k]
        same = kept_by_class.setdefault(det.class_id, [])
        if any(iou(det.bbox, other.bbox) > iou_threshold for other in same):
            continue
        same.append(det)
        keep.add(k)
    return [d for k, d in enumerate(detections) if k in keep]


def apply_params(detections: Sequence[Detection], params: CommonParams) -> list[Detection]:
    """Apply the common params to one image's detections; scores are kept as they are.

    NMS runs after the filters (a dropped box must not suppress a kept one) and before
    ``max_objects`` (duplicates must not use up the budget). ``max_objects`` keeps the highest-scoring
    items but returns them in their original order, because for some models (OCR lines) the order
    carries meaning.
    """
    kept = [d for d in detections if d.score >= params.confidence_threshold]
    if params.class_filter is not None:
        wanted_ids = {c for c in params.class_filter if isinstance(c, int)}
        wanted_labels = {c for c in params.class_filter if isinstance(c, str)}
        kept = [d for d in kept if d.class_id in wanted_ids or d.label in wanted_labels]
    if params.min_object_size is not None:
        kept = [d for d in kept if min(d.bbox[2], d.bbox[3]) >= params.min_object_size]
    if params.iou_threshold is not None:
        kept = nms(kept, params.iou_threshold)
    if params.max_objects is not None and len(kept) > params.max_objects:
        ranked = sorted(range(len(kept)), key=lambda k: kept[k].score, reverse=True)
        chosen = set(ranked[: params.max_objects])
        kept = [d for k, d in enumerate(kept) if k in chosen]
    return kept


# -- checking pre_processor_params at prepare ------------------------------------------------------

PARAMS_PATH = "pre_processor_params"
_MAX_SHOWN = 40


class ParamsRefused(ValueError):
    """``pre_processor_params`` the pre-processor cannot honour; the message is safe to show a user."""


@dataclass(frozen=True)
class CheckedParams:
    """What :func:`check_params` made of ``pre_processor_params``.

    ``params`` is what to send the app: for a declared app the known keys under their canonical
    names (``threshold`` becomes ``confidence_threshold``), for an undeclared one the keys exactly
    as given (a third-party app reads its own spelling). ``ignored`` names, as dotted paths, every
    key a declared app does not read; they are left out of ``params``. ``inference`` is the typed
    view of what is sent (``inference.batch_size``, ``inference.device``; what :func:`apply_params`
    takes).
    """

    params: dict[str, Any]
    ignored: tuple[str, ...]
    inference: InferenceParams
    app: str | None = None

    @property
    def warning(self) -> str | None:
        """One line naming every ignored key, for the driver to log once; ``None`` when none are."""
        if not self.ignored:
            return None
        who = f"the pre-processor {self.app!r}" if self.app else "the pre-processor"
        keys = ", ".join(self.ignored)
        return f"{PARAMS_PATH}: {who} does not read {keys}; ignored"


def _group_model(field: FieldInfo) -> type[BaseModel] | None:
    for arg in (field.annotation, *get_args(field.annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _input_keys(name: str, field: FieldInfo) -> tuple[str, ...]:
    """The keys a field is validated from: its alias choices, or its alias, or its name."""
    va = field.validation_alias
    if isinstance(va, AliasChoices):
        return tuple(c for c in va.choices if isinstance(c, str))
    if isinstance(va, str):
        return (va,)
    return (field.alias or name,)


def _split_known(
    data: Mapping[str, Any], model: type[BaseModel], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(keys ``model`` reads, keys it does not, their dotted paths); groups are split recursively."""
    by_key = {key: field for name, field in model.model_fields.items() for key in _input_keys(name, field)}
    known: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    paths: list[str] = []
    for key, value in data.items():
        field = by_key.get(str(key))
        if field is None:
            unknown[key] = value
            paths.append(f"{prefix}{key}")
            continue
        group = _group_model(field)
        if group is not None and isinstance(value, Mapping):
            inner, _, inner_paths = _split_known(value, group, f"{prefix}{key}.")
            known[key] = inner
            paths.extend(inner_paths)
        else:
            known[key] = value
    return known, unknown, paths


def _field_at(model: type[BaseModel], loc: Sequence[Any]) -> FieldInfo | None:
    """The field a (cleaned) error location ends in; list indexes are stepped over."""
    field: FieldInfo | None = None
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None:
            return None
        by_key = {k: f for name, f in current.model_fields.items() for k in _input_keys(name, f)}
        field = by_key.get(str(part))
        if field is None:
            return None
        current = _group_model(field)
    return field


def _clean_loc(model: type[BaseModel], loc: Sequence[Any]) -> tuple[Any, ...]:
    """The location as the user wrote it: pydantic's union-member tags (``constrained-int``) dropped."""
    out: list[Any] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif current is not None:
            out.append(part)
            by_key = {k: f for name, f in current.model_fields.items() for k in _input_keys(name, f)}
            field = by_key.get(str(part))
            current = _group_model(field) if field is not None else None
        # else: below a non-model value, a string part is a union member's tag
    return tuple(out)


def _shown(value: Any) -> str:
    """A value as a message may show it: short scalars as they are, anything else by its kind."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= _MAX_SHOWN else f"a string of {len(value)} characters"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _refusal(exc: ValidationError, model: type[BaseModel]) -> str:
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for err in exc.errors():
        merged.setdefault(_clean_loc(model, err["loc"]), []).append(err)
    problems = []
    for loc, errs in merged.items():
        err = errs[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not loc:  # a check across keys: its message names them
            problems.append(f"{PARAMS_PATH}: {msg}")
            continue
        if len(errs) > 1:  # every member of a union refused it
            msg = "not an accepted value"
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = "expected a mapping"
        where = ".".join([PARAMS_PATH, *(str(p) for p in loc)])
        field = _field_at(model, loc)
        allowed = f"; allowed: {field.description}" if field is not None and field.description else ""
        problems.append(f"{where}: {msg[:1].lower()}{msg[1:]} (got {_shown(err.get('input'))}){allowed}")
    return "; ".join(problems)


def _labels_text(labels: Mapping[int, str], limit: int = 50) -> str:
    items = [f"{name} ({cid})" for cid, name in sorted(labels.items())]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_device(spec: PreProcessorSpec | None, device: str | None) -> None:
    """Refuse a device the app cannot run on (``ValueError``); ``auto`` always resolves somewhere."""
    if spec is None or spec.devices is None or device in (None, "auto") or device in spec.devices:
        return
    runs_on = " or ".join(spec.devices)
    raise ValueError(
        f"{PARAMS_PATH}.model_config.device: {spec.name} runs on {runs_on} only, not {device}; "
        f"use device: {spec.devices[0]} (or auto)"
    )


def check_params(
    spec: PreProcessorSpec | None,
    params: Mapping[str, Any] | None,
    *,
    gpus_available: float,
    gpus_per_replica: float | None = None,
) -> CheckedParams:
    """Check ``pre_processor_params`` against what the pre-processor declares, once, at prepare.

    A bad value is refused (:class:`ParamsRefused`, naming the key, the problem and what is allowed);
    a key a declared app does not read is reported in ``ignored``, not refused, because params are
    often shared across pre-processors. ``class_filter`` must name the model's own classes, and
    ``device: cuda`` needs a GPU in the cluster (``gpus_available``, the cluster's GPU total) and,
    when ``gpus_per_replica`` is given, a release that reserves one: a replica without a GPU
    reservation cannot see the device and would quietly run on CPU.
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ParamsRefused(f"{PARAMS_PATH}: expected a mapping of keys to values, got {_shown(params)}")
    raw = dict(params)
    declared = spec.params if spec is not None else None
    model: type[CommonParams] = declared or CommonParams
    known, _unknown, ignored = _split_known(raw, model)
    try:
        parsed = model.model_validate(known)
        # Undeclared apps get the params as given, so the driver's view must be read from them too.
        inference = InferenceParams.model_validate(raw) if declared is None else None
    except ValidationError as exc:
        raise ParamsRefused(_refusal(exc, model)) from None

    if spec is not None and parsed.class_filter is not None:
        names = set(spec.labels.values())
        missing = [
            c for c in parsed.class_filter if (c not in spec.labels if isinstance(c, int) else c not in names)
        ]
        if missing:
            shown = ", ".join(_shown(c) for c in missing[:10])
            hints = [m for c in missing if isinstance(c, str) for m in difflib.get_close_matches(c, names, 1)]
            hint = f" (did you mean {hints[0]!r}?)" if hints else ""
            raise ParamsRefused(
                f"{PARAMS_PATH}.class_filter: {shown} {'is' if len(missing) == 1 else 'are'} not a class "
                f"of {spec.name}{hint}; allowed: {_labels_text(spec.labels)}"
            )

    device = parsed.device
    try:
        check_device(spec, device)
    except ValueError as exc:
        raise ParamsRefused(str(exc)) from None
    if device == "cuda" and gpus_available <= 0:
        raise ParamsRefused(
            f"{PARAMS_PATH}.model_config.device: cuda cannot be honoured: this cluster has no GPU; "
            "use device: cpu or add GPU nodes"
        )
    if device == "cuda" and gpus_per_replica is not None and gpus_per_replica <= 0:
        raise ParamsRefused(
            f"{PARAMS_PATH}.model_config.device: cuda cannot be honoured: the release reserves no GPU "
            "per replica (required_gpu_count: 0), so its replicas cannot see one; use device: cpu or "
            "deploy a release that reserves a GPU"
        )
    if parsed.batch_size is not None and spec is not None and not spec.honours_batch_size:
        raise ParamsRefused(
            f"{PARAMS_PATH}.model_config.batch_size: {spec.name} does not let a caller choose its batch "
            "size; remove the key"
        )

    if inference is not None:
        return CheckedParams(raw, (), inference, spec.name if spec else None)
    send = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return CheckedParams(send, tuple(ignored), InferenceParams.model_validate(send), spec.name)


def app_options(params: InferenceParams, model: type[CommonParams]) -> dict[str, Any]:
    """The app-specific keys of ``params`` that ``model`` declares, checked by it; ``None`` means
    "the app's default" and is left out.

    Replicas get params that may not have passed :func:`check_params` (HTTP callers), so the app
    checks its own keys again; a bad value is a ``ValueError`` naming the key (a 400 over HTTP).
    """
    own = set(model.model_fields) - set(CommonParams.model_fields)
    given = {k: v for k, v in params.extras.items() if k in own and v is not None}
    try:
        parsed = model.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(params)"
        field = model.model_fields.get(key)
        allowed = f"; allowed: {field.description}" if field is not None and field.description else ""
        raise ValueError(
            f"param {key!r}: {first['msg']} (got {_shown(first.get('input'))}){allowed}"
        ) from None
    return {k: getattr(parsed, k) for k in given}


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
