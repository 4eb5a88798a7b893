"""The preview as one self-contained HTML page: thumbnails and charts are data URIs, nothing is
fetched when it opens (from a file, in a notebook, offline).

The page stays under `MAX_PAGE_BYTES` (8 MB): thumbnails are 320 px JPEGs (10-40 kB each), and
once the next one would pass the cap (less `TEXT_RESERVE` for the tables and charts) the remaining
tasks show their outcome without a picture, saying so.
"""

from __future__ import annotations

import base64
import html
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from totask_ray.net.images import ImageDecodeError
from totask_ray.preview.charts import histograms
from totask_ray.preview.collect import TaskView
from totask_ray.preview.draw import THUMB_SIDE, colour_of, object_label, object_score, objects_of, thumbnail
from totask_ray.preview.drops import Drops
from totask_ray.preview.estimate import (
    ACTOR_START_CPU_S,
    MACHINE_STAGE,
    RAY_DATA_CPU_FACTOR,
    Estimate,
    duration,
)
from totask_ray.preview.template import PAGE

MAX_PAGE_BYTES = 8 * 1024 * 1024
TEXT_RESERVE = 1024 * 1024  # tables, charts and markup


@dataclass
class PreviewPage:
    """A rendered preview: `html`, what it counted, `save(path)`; Jupyter shows it inline."""

    html: str
    counts: dict[str, int]  # objects that would be written, per class
    outcomes: dict[int, dict[str, str]]  # task id -> status, stage, reason
    drops: list[tuple[str, str, int]] = field(default_factory=list)
    total: int = 0  # tasks the job's filters select
    timings: dict[str, float] = field(default_factory=dict)
    estimate: Estimate | None = None  # the whole job's projected wall time (`preview.estimate`)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        # In an iframe: the page's styles and script stay out of the notebook's own.
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" '
            'style="width:100%;height:720px;border:1px solid #ccc" sandbox="allow-scripts"></iframe>'
        )


def data_uri(mime: str, body: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(body).decode('ascii')}"


def render(
    views: list[TaskView],
    *,
    job: str,
    total: int,
    how: str,
    message: str,
    classes: list[str],
    drops: Drops,
    timings: dict[str, float] | None = None,
    platform_name: str = "",
    max_bytes: int = MAX_PAGE_BYTES,
    estimate: Estimate | None = None,
    controls: list[dict[str, Any]] | None = None,
) -> PreviewPage:
    from jinja2 import Environment

    project_classes = list(classes)
    classes = list(classes)
    for v in views:  # classes the project does not list still get a colour of their own
        for o in objects_of(v.would_write):
            if object_label(o) not in classes:
                classes.append(object_label(o))
    budget = max_bytes - TEXT_RESERVE
    cards, per_class, tasks_with, scores = [], Counter(), Counter(), {}
    decodes: list[float] = []
    for v in views:
        card: dict[str, Any] = {
            "task_id": v.task_id, "status": v.status, "stage": v.stage, "error": v.error,
            "image_name": v.image_name, "objects": None, "texts": [], "src": None,
            "current_src": None, "picture_note": v.image_error or "no picture",
        }  # fmt: skip
        objs = objects_of(v.would_write)
        if v.would_write is not None:
            card["objects"] = len(objs)
        for o in objs:
            name = object_label(o)
            per_class[name] += 1
            score = object_score(o)
            if score is not None:
                scores.setdefault(name, []).append(score)
            text = (o.get("properties") or {}).get("text")
            if text:
                card["texts"].append(str(text))
        for name in {object_label(o) for o in objs}:
            tasks_with[name] += 1
        if v.image is not None:
            budget = _pictures(card, v, classes, budget, decodes)
        cards.append(card)
    measured = {**(timings or {}), **_measured(views, decodes, drops)}
    charts = [
        (n, data_uri("image/png", png))
        for n, png in histograms(scores, classes, drops.below_threshold, drops.threshold).items()
    ]
    counts = [
        {"name": n, "objects": per_class[n], "tasks": tasks_with[n], "colour": colour_of(n, classes)}
        for n in classes
        if per_class[n]
    ]
    footer = (
        f"Nothing was written to the platform: this is a dry run over a sample, through the job's own "
        f"prepare, hooks, label mapping, thresholds and validation. Thumbnails: {THUMB_SIDE} px JPEGs, "
        f"the page capped at {max_bytes // (1024 * 1024)} MB."
    )
    page = Environment(autoescape=True).from_string(PAGE).render(
        job=job, total=total, how=how, message=message, views=cards, side=THUMB_SIDE, counts=counts,
        drops=drops.rows(), drops_note=drops.note or _drops_note(drops), charts=charts, footer=footer,
        stages=[(name, measured[k]) for k, name in STAGE_NAMES.items() if k in measured],
        classes=project_classes, colours=[colour_of(c, classes) for c in project_classes],
        platform_name=platform_name, estimate=_estimate_view(estimate), controls=controls or [],
    )  # fmt: skip
    if len(page.encode("utf-8")) > max_bytes:  # the reserve was not enough: never hand out more
        raise ValueError(f"the preview page came to {len(page):,} bytes, over its {max_bytes:,}-byte cap")
    return PreviewPage(
        html=page,
        counts=dict(per_class),
        outcomes={v.task_id: {"status": v.status, "stage": v.stage, "reason": v.error} for v in views},
        drops=drops.rows(),
        total=total,
        timings={k: round(v, 4) for k, v in measured.items()},
        estimate=estimate,
    )


def _pictures(
    card: dict[str, Any], v: TaskView, classes: list[str], budget: int, decodes: list[float]
) -> int:
    """The card's thumbnails (what would be written; what the task holds now, when it holds
    something), each only while the page's byte budget lasts. Returns the budget left."""
    assert v.image is not None
    # an unchanged task already holds exactly what would be written: draw that
    drawn = v.current if v.status == "unchanged" and v.would_write is None else v.would_write
    try:
        thumb = thumbnail(v.image, drawn, classes)
    except ImageDecodeError as exc:
        card["picture_note"] = exc.about("the primary file")
        return budget
    decodes.append(thumb.decode_s)
    src = data_uri("image/jpeg", thumb.jpeg)
    if len(src) > budget:
        card["picture_note"] = "picture left out: the page is at its size cap"
        return budget
    card.update(src=src, width=thumb.width, height=thumb.height, scale=thumb.scale)
    budget -= len(src)
    if objects_of(v.current):
        now = thumbnail(v.image, v.current, classes)
        now_src = data_uri("image/jpeg", now.jpeg)
        if len(now_src) <= budget:
            card.update(current_src=now_src, current_width=now.width, current_height=now.height)
            budget -= len(now_src)
    return budget


# What the page's "measured on the sample" table shows, by `PreviewPage.timings` key (seconds).
STAGE_NAMES = {
    "listing_page_s": "listing: one page of task ids",
    "task_read_s": "task read (task and data unit), median",
    "image_download_s": "primary file download, median",
    "decode_s": "image decode, median",
    "model_call_s": "pre-processor: one call with every sampled image",
    "model_per_image_s": "pre-processor: per image in that call",
    "dry_run_s": "the sample's dry run, start-up included",
    "write_probe_s": "platform round-trips of one task (read, download, write stand-in), under a burst",
}


def _estimate_view(e: Estimate | None) -> dict[str, Any] | None:
    """What the page's "Whole job" section shows of the estimate."""
    if e is None or not e.stages:
        return None
    start = f"{e.startup_s:.1f} s start-up (the sample's dry run)"
    if e.growth_s:
        start += f" + est. {e.growth_s:.1f} s starting the pool's further actors"
    if e.fresh_process:
        start += f" + {e.ray_start_s:.1f} s starting Ray + {e.prepare_s:.1f} s prepare"
    return {
        "summary": e.summary(),
        "start": start,
        "work": f"{e.tasks:,} tasks / {e.bound.per_s:,.1f} a second = {duration(e.work_s)}",
        "projected_s": round(e.projected_s),
        "stages": [(s.name, f"{s.per_s:,.1f}", s.how, s is e.bound) for s in e.stages],
        "machine": f"{RAY_DATA_CPU_FACTOR:g}" if any(s.name == MACHINE_STAGE for s in e.stages) else "",
        "actor_cpu": f"{ACTOR_START_CPU_S:g}",
    }


def _measured(views: list[TaskView], decodes: list[float], drops: Drops) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, values in (
        ("task_read_s", [v.read_s for v in views if v.read_s is not None]),
        ("image_download_s", [v.download_s for v in views if v.download_s is not None]),
        ("decode_s", decodes),
    ):
        if values:
            out[key] = statistics.median(values)
    if drops.call_s is not None and drops.call_images:
        out["model_call_s"] = drops.call_s
        out["model_per_image_s"] = drops.call_s / drops.call_images
    return out


def _drops_note(drops: Drops) -> str:
    if not drops.counts:
        return "The model found nothing on the sample that the job's params or label mapping drop."
    return (
        "Counted by asking the pre-processor again for the sample's images with the filters off, then "
        "applying the run's own apply_params and label mapping stage by stage."
    )
