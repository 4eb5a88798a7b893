"""`totask-ray diff LEDGER current` on Label Studio: what a run's tasks hold now, in the object
model the diff matches on, beside what the run wrote, read the same way.

What "current" is on Label Studio, per task of the run's ledger:

1. the person's review: the newest (by `updated_at`, then id) annotation that is not cancelled
   (skipped) and is the run's own annotation (`write: annotations`), or was made from the run's
   prediction (`parent_prediction`), or was created or updated after the run wrote the task;
2. else the run's prediction, as it is now (nobody reviewed the task: all of it counts as kept);
3. else the task is left out of the diff and counted (the run's write never landed, it was
   stopped before; or its prediction was deleted since, by a person or `totask-ray undo`).

Annotations older than the run and untouched since are not reviews of it, and are not read.
Both sides go through Label Studio's form of the object model (`to_objects`): labels by name,
coordinates in pixels of the region's original size, one object per keypoint, OCR text on the
rectangle it belongs to.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from totask_ray.ledger.place import Where
from totask_ray.ledger.store import Entry, RunHeader, read_entries, read_header
from totask_ray.platform.label_studio.to_objects import as_stored, from_results, image_size

log = logging.getLogger("totask_ray")

CHUNK = 100  # tasks per listing (Label Studio spends tens of ms of CPU per request)
CLOCK_SLACK_S = 5.0  # an annotation this close before the run's write still counts as after it


class Sides(BaseModel):
    """Both sides of a diff against `current` on Label Studio, by task id, and the tasks left out."""

    wrote: dict[int, Any] = Field(default_factory=dict)
    current: dict[int, Any] = Field(default_factory=dict)
    left_out: list[int] = Field(default_factory=list)  # nothing of the run and no review on it
    gone: list[int] = Field(default_factory=list)  # no longer in the project
    unread_regions: int = 0


def _when(stamp: Any) -> float:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _run_prediction(raw: dict[str, Any], entry: Entry, header: RunHeader) -> dict[str, Any] | None:
    preds = [p for p in raw.get("predictions") or [] if isinstance(p, dict)]
    created = entry.created or {}
    if created.get("kind") == "prediction":
        return next((p for p in preds if p.get("id") == created.get("id")), None)
    if header.write == "annotations":
        return None
    mine = [
        p for p in preds if p.get("model_version") == header.model_version and isinstance(p.get("id"), int)
    ]
    return max(mine, key=lambda p: p["id"]) if mine else None  # an unconfirmed write: the newest


def current_result(raw: dict[str, Any], entry: Entry, header: RunHeader) -> tuple[str, Any] | None:
    """What the task holds now of the run and its review: ("annotation" | "prediction", result),
    or None when it holds neither (see the module's docstring for the order)."""
    pred = _run_prediction(raw, entry, header)
    created = entry.created or {}
    own = created.get("id") if created.get("kind") == "annotation" else None
    reviews = [
        a
        for a in raw.get("annotations") or []
        if isinstance(a, dict)
        and not a.get("was_cancelled")
        and (
            (own is not None and a.get("id") == own)
            or (pred is not None and a.get("parent_prediction") == pred.get("id"))
            or max(_when(a.get("created_at")), _when(a.get("updated_at"))) >= entry.at - CLOCK_SLACK_S
        )
    ]
    if reviews:
        newest = max(reviews, key=lambda a: (_when(a.get("updated_at")), a.get("id") or 0))
        return "annotation", newest.get("result")
    if pred is not None:
        return "prediction", pred.get("result")
    return None


def label_studio_sides(run_dir: Where, token: str | None = None, concurrency: int = 4) -> Sides:
    """What the run in `run_dir` wrote and what its tasks hold now, both as objects."""
    from totask_ray.ledger.undo import platform_for
    from totask_ray.platform.connect import connect

    header = read_header(run_dir)
    entries = {tid: e for tid, e in read_entries(run_dir).items() if e.writes_data}
    client = connect(platform_for(header, token=token))
    out = Sides()
    try:
        info = client.project_info(header.project)
        ids = sorted(entries)
        chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            read = list(pool.map(lambda chunk: client.tasks_raw(header.project, chunk), chunks))
    finally:
        client.close()
    held = {tid: raw for got in read for tid, raw in got.items()}
    for tid in ids:
        raw = held.get(tid)
        if raw is None:
            out.gone.append(tid)
            continue
        now = current_result(raw, entries[tid], header)
        if now is None:
            out.left_out.append(tid)
            continue
        every = [r for p in raw.get("predictions") or [] for r in p.get("result") or []] + [
            r for a in raw.get("annotations") or [] for r in a.get("result") or []
        ]
        objects = from_results(now[1], info.classes, fallback=image_size(every))
        out.unread_regions += objects.unread
        out.current[tid] = objects.data
        out.wrote[tid] = as_stored(entries[tid].wrote, info.labeling, info.classes)
    _say(out)
    return out


def _say(s: Sides) -> None:
    if s.left_out:
        log.warning(
            "%d task(s) left out of the diff: they hold neither the run's write nor a review of it "
            "(a write the stopped run never made, or a prediction deleted since), e.g. task %d",
            len(s.left_out),
            s.left_out[0],
        )
    if s.gone:
        log.warning("%d task(s) are no longer in the project, e.g. task %d", len(s.gone), s.gone[0])
    if s.unread_regions:
        log.warning(
            "%d region(s) not read: a shape the diff does not know (a brush, a rectangle without "
            "labels), or no image size on the task",
            s.unread_regions,
        )
