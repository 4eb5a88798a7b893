"""The task-data object model as Label Studio results.

Coordinates in the object model are pixels; Label Studio's are percentages of the image's size,
so every shape needs the image's width and height. Each result names the control (`from_name`)
and the image (`to_name`) from the project's labeling config, and carries the object's confidence
as its region `score`. OCR text (`properties.text`) goes to the config's per-region `TextArea`, as
a second result with the region's id, the way Label Studio's OCR template stores it.

An object the config cannot hold (a polyline, a label no control offers) fails its task with the
reason; nothing of that task is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from totask_ray.platform.label_studio.labeling import Control, LabelingConfig

KEYPOINT_WIDTH_PCT = 0.5


class ConversionError(ValueError):
    """An object this project's labeling config cannot hold."""


def _pct(value: float, whole: int) -> float:
    return round(value / whole * 100.0, 6)


def _points(points: Sequence[Sequence[float]], w: int, h: int) -> list[list[float]]:
    return [[_pct(x, w), _pct(y, h)] for x, y in points]


def object_label(obj: Mapping[str, Any], classes: Mapping[int, str]) -> str | None:
    props = obj.get("properties") or {}
    label = props.get("label")
    if isinstance(label, str) and label:
        return label
    return classes.get(obj.get("class_id"))  # type: ignore[arg-type]


def to_results(
    data: Mapping[str, Any], config: LabelingConfig, classes: Mapping[int, str], size: tuple[int, int] | None
) -> tuple[list[dict[str, Any]], float | None]:
    """Label Studio results for `data` (dm_schema_v1, already validated) and the mean region score."""
    results: list[dict[str, Any]] = []
    scores: list[float] = []
    for obj in data.get("objects", []):
        kind = obj["type"]
        label = object_label(obj, classes)
        control = config.control_for(kind, label)
        oid = str(obj["id"])
        if control is None:
            offered = ", ".join(f"{c.name} ({c.tag})" for c in config.controls) or "none"
            raise ConversionError(
                f"object {oid} is a {kind} labelled {label!r}, and no control of the labeling config takes it "
                f"(its controls: {offered})"
            )
        score = (obj.get("properties") or {}).get("confidence")
        value = _value(kind, obj, control, label, size, oid)
        for i, v in enumerate(value):
            result: dict[str, Any] = {
                "id": oid if len(value) == 1 else f"{oid}-{i + 1}",
                "from_name": control.name,
                "to_name": control.to_name,
                "type": control.result_type,
                "value": v,
            }
            if size is not None and kind != "classification":
                result["original_width"], result["original_height"] = size
                result["image_rotation"] = 0
            if score is not None:
                result["score"] = float(score)
            results.append(result)
        if score is not None:
            scores.append(float(score))
        text = (obj.get("properties") or {}).get("text")
        if isinstance(text, str) and kind == "bbox":
            area = config.text_control(control.to_name)
            if area is not None:
                shape = {k: value[0][k] for k in ("x", "y", "width", "height", "rotation")}
                results.append(
                    {
                        "id": oid,
                        "from_name": area.name,
                        "to_name": area.to_name,
                        "type": "textarea",
                        "value": {**shape, "text": [text]},
                        **({"original_width": size[0], "original_height": size[1]} if size else {}),
                        **({"score": float(score)} if score is not None else {}),
                    }
                )
    mean = round(sum(scores) / len(scores), 6) if scores else None
    return results, mean


def _value(
    kind: str,
    obj: Mapping[str, Any],
    control: Control,
    label: str | None,
    size: tuple[int, int] | None,
    oid: str,
) -> list[dict[str, Any]]:
    if kind == "classification":
        return [{"choices": [label]}]
    named = {control.tag: [label]}
    if size is None:
        raise ConversionError("the image's size is unknown, so coordinates cannot be made percentages")
    w, h = size
    c = obj["coordinates"]
    if kind == "bbox":
        return [
            {
                "x": _pct(c["x"], w),
                "y": _pct(c["y"], h),
                "width": _pct(c["width"], w),
                "height": _pct(c["height"], h),
                "rotation": 0,
                **named,
            }
        ]
    if kind == "polygon":
        return [{"points": _points(c["points"], w, h), "closed": True, **named}]
    if kind == "keypoint":
        return [
            {"x": _pct(x, w), "y": _pct(y, h), "width": KEYPOINT_WIDTH_PCT, **named} for x, y in c["points"]
        ]
    raise ConversionError(f"object {oid} is a {kind}, which Label Studio's image tools cannot hold")
