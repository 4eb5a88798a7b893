"""The task-data object model: what may be written to a task, and factories that make it easy to get right.

Whatever a hook returns passes through `validate_task_data` before anything is written, so a bad
object fails its own task with a message naming the object and the field, instead of landing
half-valid on the platform. The factories (`bbox`, `polygon`, ...) are what plugins and serve apps
should use to build objects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_DM_V1 = "dm_schema_v1"
SCHEMA_ANY = "any"

Coord = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Size = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Point = tuple[Coord, Coord]


class AnnotationError(ValueError):
    """Data a hook produced that must not be written; the message names the object and field."""


class ObjectType(StrEnum):
    BBOX = "bbox"
    POLYGON = "polygon"
    POLYLINE = "polyline"
    KEYPOINT = "keypoint"
    CLASSIFICATION = "classification"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class BBoxCoordinates(_Strict):
    x: Coord
    y: Coord
    width: Size
    height: Size


class PolygonCoordinates(_Strict):
    points: Annotated[list[Point], Field(min_length=3)]


class PolylineCoordinates(_Strict):
    points: Annotated[list[Point], Field(min_length=2)]


class KeypointCoordinates(_Strict):
    points: Annotated[list[Point], Field(min_length=1)]


_COORDINATES: dict[ObjectType, type[_Strict] | None] = {
    ObjectType.BBOX: BBoxCoordinates,
    ObjectType.POLYGON: PolygonCoordinates,
    ObjectType.POLYLINE: PolylineCoordinates,
    ObjectType.KEYPOINT: KeypointCoordinates,
    ObjectType.CLASSIFICATION: None,
}


class TaskObject(_Strict):
    """One annotation object; `coordinates` must match `type` (none for classification)."""

    id: Annotated[str, Field(min_length=1, max_length=200)]
    class_id: Annotated[int, Field(ge=0)]
    type: ObjectType
    coordinates: dict[str, Any] | None = None
    properties: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_id", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a whole number, not true/false")
        return v

    @field_validator("properties")
    @classmethod
    def _properties(cls, v: dict[str, Any]) -> dict[str, Any]:
        conf = v.get("confidence")
        if conf is not None and (
            isinstance(conf, bool)
            or not isinstance(conf, int | float)
            or not math.isfinite(conf)
            or not 0 <= conf <= 1
        ):
            raise ValueError("confidence must be a finite number between 0 and 1")
        _require_finite(v, "properties")
        return v

    @model_validator(mode="after")
    def _coordinates_match_type(self) -> TaskObject:
        model = _COORDINATES[self.type]
        if model is None:
            if self.coordinates not in (None, {}):
                raise ValueError("a classification object takes no coordinates")
            return self
        if self.coordinates is None:
            raise ValueError(f"coordinates are required for a {self.type.value} object")
        try:
            model.model_validate(self.coordinates)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            field = ".".join(str(p) for p in err["loc"])
            msg = "is not a known field" if err["type"] == "extra_forbidden" else err["msg"]
            raise ValueError(f"coordinates.{field}: {msg}" if field else f"coordinates: {msg}") from None
        return self


class TaskData(BaseModel):
    """A task's annotation payload in dm_schema_v1: `objects`, plus free top-level metadata."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    objects: list[TaskObject]

    @model_validator(mode="after")
    def _unique_ids(self) -> TaskData:
        seen: set[str] = set()
        for i, obj in enumerate(self.objects):
            if obj.id in seen:
                raise ValueError(
                    f"objects[{i}]: id '{obj.id}' is used by an earlier object; ids must be unique"
                )
            seen.add(obj.id)
        return self


def validate_task_data(data: Any, schema: str = SCHEMA_DM_V1) -> dict[str, Any]:
    """Return `data` if it may be written under `schema`; raise `AnnotationError` naming what is wrong.

    `any` skips the object model but still requires a JSON object of finite numbers, because
    the platform stores JSON and NaN is not JSON.
    """
    if not isinstance(data, dict):
        raise AnnotationError(f"task data must be a JSON object, got {_kind(data)}")
    if not data:
        raise AnnotationError("task data is empty")
    try:
        _require_finite(data, "data")
        json.dumps(data, allow_nan=False)
    except RecursionError:
        raise AnnotationError("task data is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        raise AnnotationError(f"task data is not valid JSON: {exc}") from None
    if schema == SCHEMA_ANY:
        return data
    if "objects" not in data:
        raise AnnotationError(
            "task data has no 'objects' list (dm_schema_v1); use schema 'any' for other formats"
        )
    try:
        TaskData.model_validate(data)
    except ValidationError as exc:
        raise AnnotationError(_describe(exc, data)) from None
    except RecursionError:
        raise AnnotationError("task data is nested too deeply") from None
    return data


def _describe(exc: ValidationError, data: dict[str, Any]) -> str:
    """The first error, located as `objects[i] (id 'x').field: message`."""
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = list(err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "is not a known field"
    elif err["type"] == "missing":
        msg = "is required"
    where = "task data"
    if len(loc) >= 2 and loc[0] == "objects" and isinstance(loc[1], int):
        idx = loc[1]
        obj = data["objects"][idx] if isinstance(data.get("objects"), list) else None
        oid = obj.get("id") if isinstance(obj, dict) else None
        where = f"objects[{idx}]" + (f" (id '{oid}')" if isinstance(oid, str) and oid else "")
        rest = [str(p) for p in loc[2:]]
        # the coordinates model runs inside the object validator; pydantic reports its loc in msg
        if rest:
            where += "." + ".".join(rest)
    elif loc:
        where = ".".join(str(p) for p in loc)
    return f"{where}: {msg}"


def _require_finite(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}; numbers must be finite")
    if isinstance(value, dict):
        for k, v in value.items():
            _require_finite(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _require_finite(v, f"{path}[{i}]")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (None)"
    if isinstance(value, list):
        return "a JSON array"
    return type(value).__name__


# -- factories: the easy way to make a valid object ---------------------------------------------


def _props(label: str | None, confidence: float | None, extra: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = dict(extra)
    if label is not None:
        props["label"] = label
    if confidence is not None:
        props["confidence"] = round(float(confidence), 6)
    return props


def bbox(
    id: str,
    class_id: int,
    x: float,
    y: float,
    width: float,
    height: float,
    *,
    label: str | None = None,
    confidence: float | None = None,
    **properties: Any,
) -> dict[str, Any]:
    return {
        "id": id,
        "class_id": class_id,
        "type": "bbox",
        "coordinates": {"x": float(x), "y": float(y), "width": float(width), "height": float(height)},
        "properties": _props(label, confidence, properties),
    }


def _pointed(
    kind: Literal["polygon", "polyline", "keypoint"],
    id: str,
    class_id: int,
    points: Iterable[Sequence[float]],
    label: str | None,
    confidence: float | None,
    properties: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": id,
        "class_id": class_id,
        "type": kind,
        "coordinates": {"points": [[float(p[0]), float(p[1])] for p in points]},
        "properties": _props(label, confidence, properties),
    }


def polygon(id: str, class_id: int, points: Iterable[Sequence[float]], *, label: str | None = None,
            confidence: float | None = None, **properties: Any) -> dict[str, Any]:  # fmt: skip
    return _pointed("polygon", id, class_id, points, label, confidence, properties)


def polyline(id: str, class_id: int, points: Iterable[Sequence[float]], *, label: str | None = None,
             confidence: float | None = None, **properties: Any) -> dict[str, Any]:  # fmt: skip
    return _pointed("polyline", id, class_id, points, label, confidence, properties)


def keypoint(id: str, class_id: int, points: Iterable[Sequence[float]], *, label: str | None = None,
             confidence: float | None = None, **properties: Any) -> dict[str, Any]:  # fmt: skip
    return _pointed("keypoint", id, class_id, points, label, confidence, properties)


def classification(id: str, class_id: int, *, label: str | None = None, confidence: float | None = None,
                   **properties: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "id": id,
        "class_id": class_id,
        "type": "classification",
        "properties": _props(label, confidence, properties),
    }


def task_data(objects: Iterable[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    """Wrap objects as a task-data payload (`{"objects": [...]}` plus optional metadata)."""
    return {"objects": list(objects), **meta}


def detections_to_task_data(detections: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A pre-processor's detections in task-compatible format (what the Synapse user guide asks a
    pre-processor to return, so a plugin's hook may write it as it is).

    `[{bbox|polygon, class_id, label, score, text?}]` → `{"objects": [...]}` (bbox, or polygon
    when given); scores are kept as `properties.confidence`, OCR text as `properties.text`. An image
    with no detection gives `{"objects": []}`: a result, not a failure."""
    objects = []
    for i, det in enumerate(detections):
        props: dict[str, Any] = {}
        if det.get("text") is not None:
            props["text"] = det["text"]
        common = {"label": det.get("label"), "confidence": det.get("score"), **props}
        oid = f"obj_{i + 1:03d}"
        class_id = int(det.get("class_id", 0))
        if det.get("polygon"):
            objects.append(polygon(oid, class_id, det["polygon"], **common))
        else:
            x, y, w, h = det["bbox"]
            objects.append(bbox(oid, class_id, x, y, w, h, **common))
    return task_data(objects)
