"""The file-method demo: one annotation JSON file per task, next to a shared sample picture.

The pictures are the samples inside scikit-image's wheel (nothing is downloaded), written into the
media dir once, under `demo/images/`, and shared by every data unit, so that seeding a million
tasks writes only their annotation files.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..store import Store
from .registry import FIRST_DAY, make_project, save_image, skimage_data_dir, summary

IMAGES_DIR = "demo/images"

# name -> (file inside skimage/data, file written to the media dir, labels that fit the picture)
SAMPLE_IMAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "astronaut": ("astronaut.png", "astronaut.jpg", ("person", "flag", "rocket")),
    "camera": ("camera.png", "camera.png", ("person", "camera", "tripod")),
    "coffee": ("coffee.png", "coffee.jpg", ("cup", "saucer", "spoon")),
    "chelsea": ("chelsea.png", "chelsea.jpg", ("cat",)),
    "rocket": ("rocket.jpg", "rocket.jpg", ("rocket", "tree")),
    "motorcycle": ("motorcycle_left.png", "motorcycle.jpg", ("motorcycle", "person")),
}
CLASS_IDS: dict[str, int] = {
    label: i
    for i, label in enumerate(sorted({lb for *_, labels in SAMPLE_IMAGES.values() for lb in labels}), 1)
}
STATUSES = (("pending", 0.5), ("in_progress", 0.2), ("completed", 0.2), ("in_review", 0.1))
DEMO_USERS = ("annotator_1", "annotator_2", "reviewer_1")
DAYS = 10


def write_sample_images(media_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Write the sample images into `media_dir/demo/images/` (once) and describe them:
    `{name: {"path": <relative path>, "width", "height", "labels"}}`.

    Uses the pictures in the installed scikit-image wheel; without scikit-image, draws synthetic
    ones so the demo still works."""
    from PIL import Image, ImageDraw

    media_dir = Path(media_dir)
    out_dir = media_dir / IMAGES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    src_dir = skimage_data_dir()
    found: dict[str, dict[str, Any]] = {}
    for name, (src_name, out_name, labels) in SAMPLE_IMAGES.items():
        target = out_dir / out_name
        src = None if src_dir is None else src_dir / src_name
        if not target.exists():
            if src is not None and src.is_file():
                img = Image.open(src)
                img.load()
            else:  # no scikit-image: a synthetic picture, deterministic from the name
                rng = random.Random(name)
                img = Image.new("RGB", (512, 384), tuple(rng.randrange(256) for _ in range(3)))
                draw = ImageDraw.Draw(img)
                for _ in range(6):
                    x, y = rng.randrange(400), rng.randrange(300)
                    draw.rectangle(
                        (x, y, x + rng.randrange(20, 110), y + rng.randrange(20, 80)),
                        fill=tuple(rng.randrange(256) for _ in range(3)),
                    )
            save_image(img, target, jpeg_quality=90)
        with Image.open(target) as im:
            width, height = im.size
        found[name] = {"path": f"{IMAGES_DIR}/{out_name}", "width": width, "height": height, "labels": labels}
    return found


def make_annotation(rng: random.Random, width: int, height: int, labels: tuple[str, ...]) -> dict[str, Any]:
    """A task-data object in the user guide's format: 1-5 bbox and polygon objects in the image."""
    rnd = rng.random  # int(rnd() * n) is several times faster than randint and as deterministic

    def ri(lo: int, hi: int) -> int:
        return lo + int(rnd() * (hi - lo + 1))

    objects = []
    for k in range(ri(1, 5)):
        label = labels[int(rnd() * len(labels))]
        props = {"label": label, "confidence": round(0.5 + rnd() * 0.49, 2)}
        if rnd() < 0.7:
            w = ri(8, max(9, width // 2))
            h = ri(8, max(9, height // 2))
            obj = {
                "type": "bbox",
                "coordinates": {"x": ri(0, width - w), "y": ri(0, height - h), "width": w, "height": h},
            }
        else:
            # a star-shaped polygon around (cx, cy), points in angle order, clamped to the image
            cx, cy = ri(20, width - 20), ri(20, height - 20)
            n = ri(3, 6)
            pts = []
            for j in range(n):
                r = ri(8, 60)
                a = 2 * math.pi * j / n
                px = min(width - 1, max(0, int(cx + r * math.cos(a))))
                py = min(height - 1, max(0, int(cy + r * math.sin(a))))
                pts.append([px, py])
            obj = {"type": "polygon", "coordinates": {"points": pts}}
        objects.append({"id": f"obj_{k + 1:03d}", "class_id": CLASS_IDS[label], **obj, "properties": props})
    return {"objects": objects}


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _write_files(root: str, items: list[tuple[str, bytes]]) -> None:
    made: set[str] = set()
    for rel, payload in items:
        parent = rel.rsplit("/", 1)[0]
        if parent not in made:
            os.makedirs(f"{root}/{parent}", exist_ok=True)
            made.add(parent)
        fd = os.open(f"{root}/{rel}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)


def seed_files_demo(store: Store, media_dir: str | Path, tasks: int = 100, seed: int = 0) -> dict[str, Any]:
    """A file-method demo project: a data collection with specifications `image_1` (primary image)
    and `annotation_data` (JSON), `tasks` data units each with a shared sample image and its own
    annotation JSON file, and one task per unit with varied status, assignee and creation day.

    Deterministic from `seed` (except the ids). Returns the ids and counts it made."""
    if tasks < 0:
        raise ValueError("tasks must be >= 0")
    media_dir = Path(media_dir)
    images = write_sample_images(media_dir)
    image_names = sorted(images)
    rng = random.Random(seed)
    rnd = rng.random
    media_root = str(media_dir)

    users = [{"id": store.create_user(u), "username": u} for u in DEMO_USERS]
    specs = [
        {"name": "image_1", "is_primary": True, "is_required": True, "file_type": "image"},
        {"name": "annotation_data", "is_primary": False, "is_required": False, "file_type": "json"},
    ]
    project_id, dc_id = make_project(store, "Files", tasks, seed, specs)

    rel_dir = f"demo/files/p{project_id}"
    units: list[dict[str, Any]] = []
    task_rows: list[dict[str, Any]] = []
    statuses, weights = zip(*STATUSES, strict=True)
    pending_writes: list[tuple[str, bytes]] = []
    # The annotation files are written 1000 at a time on a thread while the next ones are drawn.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="seed-writer") as writer:
        futures = []
        for i in range(tasks):
            name = image_names[int(rnd() * len(image_names))]
            img = images[name]
            ann = make_annotation(rng, img["width"], img["height"], img["labels"])
            bucket = f"{rel_dir}/{i // 1000:04d}"
            ann_rel = f"{bucket}/annotation_{i:06d}.json"
            pending_writes.append((ann_rel, _ENCODE(ann).encode()))
            if len(pending_writes) == 1000:
                futures.append(writer.submit(_write_files, media_root, pending_writes))
                pending_writes = []
            ext = img["path"].rsplit(".", 1)[-1]
            units.append(
                {
                    "meta": {"index": i, "image": name},
                    "files": {
                        "image_1": {
                            "path": img["path"],
                            "file_name_original": f"{name}_{i:06d}.{ext}",
                            "is_primary": True,
                        },
                        "annotation_data": {
                            "path": ann_rel,
                            "file_name_original": f"annotation_{i:06d}.json",
                            "is_primary": False,
                        },
                    },
                }
            )
            status = rng.choices(statuses, weights)[0]
            assignee = None if rnd() < 0.4 else users[int(rnd() * len(users))]["id"]
            created = FIRST_DAY + timedelta(
                seconds=int(rnd() * DAYS * 86400), microseconds=int(rnd() * 1_000_000)
            )
            task_rows.append({"status": status, "assignee": assignee, "created_at": created})
        if pending_writes:
            futures.append(writer.submit(_write_files, media_root, pending_writes))
        for f in futures:
            f.result()

    du_ids = store.create_data_units_bulk(dc_id, units)
    for row, du in zip(task_rows, du_ids, strict=True):
        row["data_unit"] = du
    task_ids = store.create_tasks_bulk(project_id, task_rows)

    by_status = Counter(r["status"] for r in task_rows)
    by_assignee = Counter("null" if r["assignee"] is None else str(r["assignee"]) for r in task_rows)
    by_day = Counter(r["created_at"].date().isoformat() for r in task_rows)
    out = summary("files", seed, project_id, dc_id, specs, du_ids, task_ids, "annotation_data")
    out["counts_by_status"] = dict(sorted(by_status.items()))
    out["counts_by_assignee"] = dict(sorted(by_assignee.items()))
    out["counts_by_day"] = dict(sorted(by_day.items()))
    out["users"] = users
    out["images"] = sorted(img["path"] for img in images.values())
    return out
