"""What changed between two versions of the same tasks' annotation data: kept, moved, relabelled,
deleted, added, per class; per task and overall.

A is the earlier side (what a run wrote), B the later (what the tasks hold now, after review, or
what another run wrote). Objects are matched per task, one to one:

1. objects of the same type are paired greedily by overlap, best first: boxes and polygons by IoU
   (polygons rasterised), other shapes by equal coordinates (within `SAME_PX`, 0.01 px); a pair
   needs IoU >= `MATCH_IOU` (0.3), the same class first, then any class;
2. a pair of the same class is *kept* when its IoU is >= `KEEP_IOU` (0.9) and its text (OCR's
   `properties.text`) is equal, else *moved* (a box a reviewer dragged, resized or re-traced);
   a text that differs on an unmoved region counts as *relabelled*, as does a pair of different
   classes;
3. an object of A left unpaired was *deleted*; one of B left unpaired was *added*.

KEEP_IOU = 0.9: two boxes that differ by a reviewer's nudge of a few pixels on a 100-pixel box
stay above it; a move of a tenth of the box's width falls below it. MATCH_IOU = 0.3: below it, a
reviewer drew a different object. The edit rate is (moved + relabelled + deleted + added) / the
objects of A (or of B where A has none), over all tasks.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

KEEP_IOU = 0.9
MATCH_IOU = 0.3
SAME_PX = 0.01  # other shapes (keypoints, polylines) match where every coordinate is this close
KINDS = ("kept", "moved", "relabelled", "deleted", "added")
_RASTER = 256  # polygons are compared on a grid this many cells across their joint bounding box


@dataclass(frozen=True)
class Obj:
    cls: str  # the class as a person reads it: the label where there is one, else the class id
    type: str
    coords: Any
    text: str | None


def _objects(data: Any) -> list[Obj]:
    listed = data.get("objects") if isinstance(data, dict) else None
    out = []
    for o in listed if isinstance(listed, list) else []:
        if not isinstance(o, dict):
            continue
        props = o.get("properties") if isinstance(o.get("properties"), dict) else {}
        cls = props.get("label") or o.get("class_id")
        text = props.get("text")
        out.append(
            Obj(str(cls), str(o.get("type")), o.get("coordinates"), None if text is None else str(text))
        )
    return out


def _box(c: Any) -> tuple[float, float, float, float] | None:
    try:
        return (
            float(c["x"]),
            float(c["y"]),
            float(c["x"]) + float(c["width"]),
            float(c["y"]) + float(c["height"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _points(c: Any) -> list[tuple[float, float]] | None:
    try:
        return [(float(p[0]), float(p[1])) for p in c["points"]]
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _polygon_iou(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """IoU of two polygons rasterised on one grid over both (exact enough at 256 cells across)."""
    import numpy as np
    from PIL import Image, ImageDraw

    xs = [p[0] for p in a + b]
    ys = [p[1] for p in a + b]
    x0, y0 = min(xs), min(ys)
    span = max(max(xs) - x0, max(ys) - y0) or 1.0
    scale = (_RASTER - 1) / span

    def mask(poly: list[tuple[float, float]]) -> Any:
        img = Image.new("1", (_RASTER, _RASTER), 0)
        ImageDraw.Draw(img).polygon([((x - x0) * scale, (y - y0) * scale) for x, y in poly], fill=1)
        return np.asarray(img, dtype=bool)

    ma, mb = mask(a), mask(b)
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 0.0


def overlap(a: Obj, b: Obj) -> float:
    """How much two objects of one type cover each other: IoU for boxes and polygons, 1 or 0 for
    the rest (equal coordinates), 1 for classifications."""
    if a.type != b.type:
        return 0.0
    if a.type == "bbox":
        ba, bb = _box(a.coords), _box(b.coords)
        return _box_iou(ba, bb) if ba and bb else 0.0
    if a.type == "polygon":
        pa, pb = _points(a.coords), _points(b.coords)
        return _polygon_iou(pa, pb) if pa and pb and len(pa) >= 3 and len(pb) >= 3 else 0.0
    if a.type == "classification":
        return 1.0
    return 1.0 if _close(a.coords, b.coords) else 0.0


def _close(a: Any, b: Any) -> bool:
    """Equal coordinates, numbers within `SAME_PX` (a point read back from Label Studio's
    percentages is off by a rounding error, never by a person's move)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if _is_number(a) and _is_number(b):
        return abs(float(a) - float(b)) <= SAME_PX
    return a == b


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class TaskDiff(BaseModel):
    task_id: int
    counts: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    by_class: dict[str, dict[str, int]] = Field(default_factory=dict)
    objects_a: int = 0
    objects_b: int = 0

    @property
    def edits(self) -> int:
        return sum(self.counts[k] for k in KINDS if k != "kept")

    def describe(self) -> str:
        """'1 moved, 1 deleted' (what a person did to what the run wrote)."""
        said = [f"{self.counts[k]} {k}" for k in KINDS if k != "kept" and self.counts[k]]
        return ", ".join(said) if said else "no object changed (other fields differ)"


def compare_task(task_id: int, a: Any, b: Any) -> TaskDiff:
    oa, ob = _objects(a), _objects(b)
    out = TaskDiff(task_id=task_id, objects_a=len(oa), objects_b=len(ob))

    def count(kind: str, cls: str) -> None:
        out.counts[kind] += 1
        row = out.by_class.setdefault(cls, dict.fromkeys(KINDS, 0))
        row[kind] += 1

    pairs = []
    for i, x in enumerate(oa):
        for j, y in enumerate(ob):
            iou = overlap(x, y)
            if iou >= MATCH_IOU:
                pairs.append((x.cls != y.cls, -iou, i, j))
    pairs.sort()  # the same class first, then the best overlap
    used_a: set[int] = set()
    used_b: set[int] = set()
    for other_class, neg_iou, i, j in pairs:
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        x = oa[i]
        if other_class:
            count("relabelled", x.cls)
        elif -neg_iou < KEEP_IOU:
            count("moved", x.cls)
        elif x.text != ob[j].text:
            count("relabelled", x.cls)
        else:
            count("kept", x.cls)
    for i, x in enumerate(oa):
        if i not in used_a:
            count("deleted", x.cls)
    for j, y in enumerate(ob):
        if j not in used_b:
            count("added", y.cls)
    return out


class DiffResult(BaseModel):
    """Both sides' names, the totals per class and overall, the edit rate, and every task."""

    a: str
    b: str
    tasks: int = 0
    tasks_edited: int = 0
    objects_a: int = 0
    objects_b: int = 0
    totals: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    by_class: dict[str, dict[str, int]] = Field(default_factory=dict)
    edit_rate: float = 0.0
    keep_iou: float = KEEP_IOU
    match_iou: float = MATCH_IOU
    per_task: list[TaskDiff] = Field(default_factory=list)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["task_id", "objects_a", "objects_b", *KINDS])
        for t in self.per_task:
            w.writerow([t.task_id, t.objects_a, t.objects_b, *(t.counts[k] for k in KINDS)])
        return buf.getvalue()


@dataclass
class _Sum:
    totals: Counter[str] = field(default_factory=Counter)
    by_class: dict[str, Counter[str]] = field(default_factory=dict)


def compare(a_name: str, b_name: str, pairs: Iterable[tuple[int, Any, Any]]) -> DiffResult:
    """Every task's diff (`pairs`: task id, A's data, B's data) and their sums."""
    out = DiffResult(a=a_name, b=b_name)
    s = _Sum()
    for tid, a, b in pairs:
        t = compare_task(tid, a, b)
        out.per_task.append(t)
        out.tasks += 1
        out.tasks_edited += t.edits > 0
        out.objects_a += t.objects_a
        out.objects_b += t.objects_b
        s.totals.update(t.counts)
        for cls, row in t.by_class.items():
            s.by_class.setdefault(cls, Counter()).update(row)
    out.totals = {k: s.totals[k] for k in KINDS}
    out.by_class = {c: {k: row[k] for k in KINDS} for c, row in sorted(s.by_class.items())}
    edits = sum(out.totals[k] for k in KINDS if k != "kept")
    base = out.objects_a or out.objects_b
    out.edit_rate = round(edits / base, 6) if base else 0.0
    return out


def pairs_of(a: Mapping[int, Any], b: Mapping[int, Any]) -> list[tuple[int, Any, Any]]:
    """The tasks both sides hold, in id order."""
    return [(tid, a[tid], b[tid]) for tid in sorted(set(a) & set(b))]
