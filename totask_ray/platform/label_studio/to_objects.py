"""Label Studio results read back as the task-data object model: the inverse of `convert.py`, so
what a task holds now on Label Studio (a prediction, a person's annotation) can be compared with
what a run wrote (`totask-ray diff LEDGER current`).

Both directions must land on the same objects, so `as_stored` says what Label Studio keeps of
the object model a run wrote, and `from_results` reads a result into that same form:

- every object carries its label (`properties.label`: the class as the config names it) and the
  class id the config's label order gives it;
- coordinates are pixels: percentages times the region's `original_width` / `original_height`
  (a region without them takes the size another region of the task gives; one with none anywhere
  is not read, and counted as unread);
- a rectangle a person rotated is its axis-aligned bounding box (the object model has no rotation);
- a keypoint is one object per point (Label Studio holds one region per point);
- a `choices` result is one classification per choice;
- a per-region `textarea` is the OCR text (`properties.text`) of the rectangle with its id;
- results of other types (a brush, a plain `rectangle` without labels) are not read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from totask_ray.platform.label_studio.convert import object_label
from totask_ray.platform.label_studio.labeling import LabelingConfig

LABEL_KEYS = {
    "rectanglelabels": "bbox",
    "polygonlabels": "polygon",
    "keypointlabels": "keypoint",
}


@dataclass
class Objects:
    """A result read back: its objects (dicts in the object model) and how many regions were not
    read (no image size anywhere on the task, or a shape this reader does not know)."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    unread: int = 0

    @property
    def data(self) -> dict[str, Any]:
        return {"objects": self.objects}


def _size(region: Mapping[str, Any]) -> tuple[float, float] | None:
    w, h = region.get("original_width"), region.get("original_height")
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return (float(w), float(h)) if ok else None  # type: ignore[arg-type]


def image_size(results: Iterable[Any]) -> tuple[float, float] | None:
    """The first image size any region of these results states (a task has one image)."""
    for r in results:
        if isinstance(r, dict) and (size := _size(r)) is not None:
            return size
    return None


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError("not a number")
    return float(v)


def _bbox(value: Mapping[str, Any], w: float, h: float) -> dict[str, float]:
    x, y = _num(value["x"]) * w / 100, _num(value["y"]) * h / 100
    bw, bh = _num(value["width"]) * w / 100, _num(value["height"]) * h / 100
    angle = _num(value.get("rotation") or 0)
    if angle % 360 == 0:
        return {"x": x, "y": y, "width": bw, "height": bh}
    # Label Studio turns a rectangle about its top-left corner
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    xs = [x + dx * c - dy * s for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    ys = [y + dx * s + dy * c for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
    return {"x": min(xs), "y": min(ys), "width": max(xs) - min(xs), "height": max(ys) - min(ys)}


def _text(value: Mapping[str, Any]) -> str | None:
    text = value.get("text")
    if isinstance(text, str):
        return text
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return "\n".join(text)
    return None


def from_results(
    results: Any, classes: Mapping[int, str], fallback: tuple[float, float] | None = None
) -> Objects:
    """One prediction's or annotation's `result` as objects. `classes`: the project's (id -> label,
    config order); `fallback`: the image size where a region states none."""
    ids = {name: cid for cid, name in classes.items()}
    regions = [r for r in (results if isinstance(results, list) else []) if isinstance(r, dict)]
    texts = {
        str(r["id"]): t
        for r in regions
        if r.get("type") == "textarea" and r.get("id") is not None
        for t in [_text(r.get("value") or {})]
        if t is not None
    }
    size = image_size(regions) or fallback
    out = Objects()

    def add(oid: str, kind: str, label: Any, coords: Any, text: str | None = None) -> None:
        props: dict[str, Any] = {"label": str(label)}
        if text is not None:
            props["text"] = text
        out.objects.append(
            {
                "id": oid,
                "class_id": ids.get(str(label)),
                "type": kind,
                "coordinates": coords,
                "properties": props,
            }
        )

    for n, r in enumerate(regions):
        rtype, value = r.get("type"), r.get("value")
        if rtype == "textarea":
            continue  # read with its rectangle
        if not isinstance(value, dict):
            out.unread += 1
            continue
        oid = str(r.get("id") or f"r{n}")
        if rtype == "choices":
            for choice in value.get("choices") or []:
                add(oid, "classification", choice, None)
            continue
        kind = LABEL_KEYS.get(str(rtype))
        labels = value.get(str(rtype))
        where = _size(r) or size
        if kind is None or not isinstance(labels, list) or not labels or where is None:
            out.unread += 1
            continue
        w, h = where
        try:
            if kind == "bbox":
                add(oid, kind, labels[0], _bbox(value, w, h), texts.get(oid))
            elif kind == "polygon":
                points = [[_num(p[0]) * w / 100, _num(p[1]) * h / 100] for p in value["points"]]
                add(oid, kind, labels[0], {"points": points})
            else:
                add(
                    oid,
                    kind,
                    labels[0],
                    {"points": [[_num(value["x"]) * w / 100, _num(value["y"]) * h / 100]]},
                )
        except (KeyError, TypeError, ValueError, IndexError):
            out.unread += 1
    return out


def as_stored(data: Any, labeling: LabelingConfig, classes: Mapping[int, str]) -> dict[str, Any]:
    """What Label Studio keeps of object-model data a run wrote, in `from_results`'s form: each
    object labelled, a keypoint of several points as one object per point, OCR text kept only
    where the config has a text area for the rectangle's image, objects no control takes left out
    (the run could not have written them)."""
    listed = data.get("objects") if isinstance(data, dict) else None
    ids = {name: cid for cid, name in classes.items()}
    objects = []
    for o in listed if isinstance(listed, list) else []:
        if not isinstance(o, dict):
            continue
        kind, label = o.get("type"), object_label(o, classes)
        control = labeling.control_for(str(kind), label)
        if control is None or label is None:
            continue
        props: dict[str, Any] = {"label": label}
        text = (o.get("properties") or {}).get("text")
        if kind == "bbox" and isinstance(text, str) and labeling.text_control(control.to_name) is not None:
            props["text"] = text
        base = {"class_id": ids.get(label), "type": kind, "properties": props}
        coords = o.get("coordinates")
        if kind == "keypoint" and isinstance(coords, dict) and isinstance(coords.get("points"), list):
            points = coords["points"]
            for i, p in enumerate(points):
                oid = str(o.get("id")) if len(points) == 1 else f"{o.get('id')}-{i + 1}"
                objects.append({"id": oid, **base, "coordinates": {"points": [p]}})
            continue
        objects.append(
            {"id": str(o.get("id")), **base, "coordinates": None if kind == "classification" else coords}
        )
    return {"objects": objects}
