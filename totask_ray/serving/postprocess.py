"""What is done to a model's detections after it returns them, by the app or by the driver.

The common params (``confidence_threshold``, ``class_filter``, ``min_object_size``, NMS,
``max_objects``) applied to one image's detections, and the small helpers model wrappers and
handles share: IoU, box clipping, the JSON-ready form of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from totask_ray.serving.interface import Detection
from totask_ray.serving.params import CommonParams

__all__ = ["apply_params", "clip_box", "detections_to_dicts", "iou", "nms"]


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
