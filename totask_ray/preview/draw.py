"""What would be written, drawn on a downscaled copy of the task's image (Pillow's ImageDraw).

Objects are in the task-data object model (`annotation.py`), in the image's pixels: the payload a
dry run records, on either platform (Label Studio's percentages are made later, by its client).
Each class has one colour from `PALETTE`, in the order of the classes the page lists, so the same
class looks the same on every thumbnail and in the counts; boxes get their class name and score
inside their top-left corner, OCR text goes under its region.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from totask_ray.net.images import decode_image

# Saturated colours that stay apart after JPEG; the first is what a one-class project (the faces
# demo) draws in, and what the browser test looks for on the screenshot.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 255),
    (0, 230, 255),
    (255, 210, 0),
    (0, 255, 90),
    (255, 80, 40),
    (90, 120, 255),
    (255, 140, 200),
)
THUMB_SIDE = 320  # the longest side of a thumbnail, in px
LINE = 3  # outline width on the thumbnail, px
JPEG_QUALITY = 82


@dataclass(frozen=True)
class Thumbnail:
    """A drawn thumbnail: its JPEG bytes, its size, and thumbnail px per image px."""

    jpeg: bytes
    width: int
    height: int
    scale: float
    decode_s: float = 0.0  # decoding the image (as the annotators do), measured here


def colour_of(label: str, classes: Sequence[str]) -> tuple[int, int, int]:
    i = classes.index(label) if label in classes else len(classes)
    return PALETTE[i % len(PALETTE)]


def object_label(obj: dict[str, Any]) -> str:
    """The class name an object shows: its `properties.label`, else its class id."""
    props = obj.get("properties") if isinstance(obj.get("properties"), dict) else {}
    label = props.get("label")
    return str(label) if label is not None else f"class {obj.get('class_id', '?')}"


def object_score(obj: dict[str, Any]) -> float | None:
    props = obj.get("properties") if isinstance(obj.get("properties"), dict) else {}
    score = props.get("confidence")
    return float(score) if isinstance(score, int | float) and not isinstance(score, bool) else None


def objects_of(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("objects"), list):
        return [o for o in data["objects"] if isinstance(o, dict)]
    return []


def thumbnail(body: bytes, data: Any, classes: Sequence[str], side: int = THUMB_SIDE) -> Thumbnail:
    """`body` (an encoded image) downscaled to `side` and `data`'s objects drawn on it.

    Decoded by the same `decode_image` the annotators use, so coordinates mean the same pixels."""
    t0 = time.perf_counter()
    img = Image.fromarray(decode_image(body))
    decode_s = time.perf_counter() - t0
    scale = min(1.0, side / max(img.size))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS) if scale < 1 else img.copy()
    draw = ImageDraw.Draw(img)
    font = _font()
    for obj in objects_of(data):
        _draw_object(draw, obj, scale, colour_of(object_label(obj), classes), font)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=JPEG_QUALITY)
    return Thumbnail(out.getvalue(), img.width, img.height, scale, decode_s)


def _font() -> Any:
    try:
        return ImageFont.load_default(size=12)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font, one size
        return ImageFont.load_default()


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any], k: float, colour: Any, font: Any) -> None:
    kind, coords = obj.get("type"), obj.get("coordinates") or {}
    score = object_score(obj)
    caption = object_label(obj) + (f" {score:.2f}" if score is not None else "")
    props = obj.get("properties") if isinstance(obj.get("properties"), dict) else {}
    text = props.get("text")
    if kind == "bbox":
        x0, y0 = coords["x"] * k, coords["y"] * k
        x1, y1 = x0 + coords["width"] * k, y0 + coords["height"] * k
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=LINE)
        _tag(draw, (x0 + LINE, y0 + LINE), caption, colour, font)
        if text:
            _tag(draw, (x0, y1 + 2), str(text), colour, font)
        return
    points = [(p[0] * k, p[1] * k) for p in coords.get("points", []) if len(p) >= 2]
    if not points:
        return
    if kind == "polygon" and len(points) >= 3:
        draw.polygon(points, outline=colour, width=LINE)
    elif kind == "polyline" and len(points) >= 2:
        draw.line(points, fill=colour, width=LINE)
    else:  # keypoints
        r = LINE + 1
        for x, y in points:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    left, top = min(p[0] for p in points), min(p[1] for p in points)
    bottom = max(p[1] for p in points)
    if text:  # OCR: the text under its region, where the eye looks for it
        _tag(draw, (left, bottom + 2), str(text), colour, font)
    else:
        _tag(draw, (left, top), caption, colour, font)


def _tag(draw: ImageDraw.ImageDraw, at: tuple[float, float], text: str, colour: Any, font: Any) -> None:
    box = draw.textbbox(at, text, font=font)
    draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=colour)
    draw.text(at, text, fill=(0, 0, 0), font=font)
