"""The demo registry, and what more than one demo needs: pictures, projects, tasks, the answer.

It imports none of the demos (`__init__` fills `DEMOS`), so a demo module can use it freely. A
demo is a function `(store, media_dir, *, tasks, seed, ...) -> dict` that returns the ids it made
as a JSON-able dict; `POST /_local/seed/` offers its keyword arguments as the body's fields.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..store import Store

# Demos by name, in the order `POST /_local/seed/` lists them when a name is wrong.
DEMOS: dict[str, Callable[..., dict[str, Any]]] = {}
# The one specification of the inference demos, whose pre-processors read a single picture.
IMAGE_SPECS: tuple[dict[str, Any], ...] = (
    {"name": "image_1", "is_primary": True, "is_required": True, "file_type": "image"},
)
INFERENCE_DIR = "demo/inference"
# The first creation day of the demos' tasks: fixed, so that the same seed makes the same project.
FIRST_DAY = datetime(2025, 1, 1, tzinfo=UTC)


def skimage_data_dir() -> Path | None:
    """The sample pictures inside scikit-image's wheel, found without importing it (a slow import
    for a few files)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "data"
    return d if d.is_dir() else None


def save_image(img: Any, path: Path, *, jpeg_quality: int) -> None:
    """Write `img` as JPEG or PNG (by suffix) through a temporary file, so that a server reading the
    media dir meanwhile never sees half a picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".jpg":
        img.convert("RGB").save(tmp, format="JPEG", quality=jpeg_quality)
    else:
        img.save(tmp, format="PNG")
    os.replace(tmp, path)


def make_project(
    store: Store,
    kind: str,
    tasks: int,
    seed: int,
    specs: Sequence[Mapping[str, Any]],
    classes: list[str] | None = None,
) -> tuple[int, int]:
    """A data collection with `specs` and a project on it, named after the demo and its seed."""
    dc_id = store.create_data_collection(f"{kind} demo collection (seed {seed})", specs)
    project_id = store.create_project(f"{kind} demo: {tasks} tasks (seed {seed})", dc_id, classes)
    return project_id, dc_id


def _span(ids: list[int]) -> dict[str, int | None]:
    return {"first": ids[0] if ids else None, "last": ids[-1] if ids else None}


def summary(
    demo: str,
    seed: int,
    project_id: int,
    dc_id: int,
    specs: Sequence[Mapping[str, Any]],
    du_ids: list[int],
    task_ids: list[int],
    target_specification: str | None = None,
) -> dict[str, Any]:
    """The part of a demo's answer that every demo gives: what to point a run at."""
    out: dict[str, Any] = {
        "demo": demo,
        "seed": seed,
        "project": project_id,
        "data_collection": dc_id,
        "specifications": [s["name"] for s in specs],
        "primary_specification": "image_1",
    }
    if target_specification is not None:
        out["target_specification"] = target_specification
    out["tasks"] = len(task_ids)
    out["task_ids"] = _span(task_ids)
    out["data_units"] = _span(du_ids)
    return out


def _serve_apps_dir() -> Path:
    spec = importlib.util.find_spec("serve_apps")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the serve_apps package is not installed; install totask-ray with its apps")
    return Path(next(iter(spec.submodule_search_locations)))


def release_config(app: str) -> dict[str, Any]:
    """`serve_apps/<app>/config.yaml`, validated strictly and dumped as JSON (what a plugin release
    row stores)."""
    from totask_ray.serving.config import load_release_config

    cfg = load_release_config(_serve_apps_dir() / app)
    return cfg.model_dump(mode="json", exclude_none=True)


def release_id(store: Store, app: str) -> int:
    """The plugin release of `app`: the stored one when its config is the same, else a new one (so
    re-seeding does not pile up identical releases)."""
    config = release_config(app)
    found = store.find_plugin_release(config["code"], config["version"])
    if found is not None and found["config"] == config:
        return int(found["id"])
    return store.create_plugin_release(config["code"], config["version"], config)


DEMO_CLASSES = {"faces": "face", "ocr": "text"}


def inference_project(store: Store, demo: str, kind: str, tasks: int, seed: int) -> tuple[int, int, str]:
    """A project for an inference demo (`kind` names it), and the media folder for its pictures.

    Its one class is the demo model's label (`face`, `text`), so the model's labels map by name."""
    project_id, dc_id = make_project(store, kind, tasks, seed, IMAGE_SPECS, [DEMO_CLASSES[demo]])
    return project_id, dc_id, f"{INFERENCE_DIR}/{demo}/p{project_id}"


def inference_demo_answer(
    store: Store,
    demo: str,
    seed: int,
    project_id: int,
    dc_id: int,
    units: list[dict[str, Any]],
    truths: list[Any],
    counts: dict[str, int],
    release: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Store an inference demo's data units with one pending task each (a minute apart from
    `FIRST_DAY`), and answer with what a run needs: the release as `pre_processor`, the params to
    run it with, and `truth` by task id, to score the run against."""
    du_ids = store.create_data_units_bulk(dc_id, units)
    rows = [
        {"data_unit": du, "status": "pending", "created_at": FIRST_DAY + timedelta(minutes=i)}
        for i, du in enumerate(du_ids)
    ]
    task_ids = store.create_tasks_bulk(project_id, rows)
    out = summary(demo, seed, project_id, dc_id, IMAGE_SPECS, du_ids, task_ids)
    out["counts"] = counts
    out["pre_processor"] = release
    out["pre_processor_params"] = dict(params)
    out["truth"] = {tid: t for tid, t in zip(task_ids, truths, strict=True)}
    return out
