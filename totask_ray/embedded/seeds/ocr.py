"""The OCR demo: pictures of words with the text as truth, to score the OCR pre-processor.

Each task gets its own image: black words on white in Pillow's bundled font, one or two lines.
Truth: the lines, joined with a newline. Tuned against the in-process RapidOCR reader with
`OCR_PARAMS` (tests/test_seed_inference.py checks it): every text is read exactly. Nothing is
downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..store import Store
from .registry import (
    inference_demo_answer,
    inference_project,
    release_id,
    save_image,
)

# Inference params the demo is meant to be run with (see `faces.FACES_PARAMS`).
OCR_PARAMS: dict[str, Any] = {}

# Words RapidOCR (PP-OCRv6 small) reads exactly in Pillow's default font at 36-48 px. No digits, so
# no O/0 or l/1 confusions (seeds 0-9 of this demo, 240 images: every one read exactly).
OCR_WORDS = [
    "ALPHA",
    "BRAVO",
    "DELTA",
    "ECHO",
    "HOTEL",
    "KILO",
    "MANGO",
    "NORTH",
    "OCEAN",
    "PAPER",
    "QUEST",
    "RIVER",
    "SOLAR",
    "TIGER",
    "UNDER",
    "VECTOR",
    "WATER",
    "YELLOW",
    "ZEBRA",
    "apple",
    "bread",
    "cloud",
    "dream",
    "earth",
    "frame",
    "grape",
    "house",
    "light",
    "money",
    "night",
    "paint",
    "quick",
    "road",
    "stone",
    "train",
    "green",
    "blue",
    "table",
    "chair",
    "window",
    "market",
    "garden",
    "summer",
    "winter",
]
OCR_FONT_SIZES = (36, 40, 48)
OCR_WIDTH = 640
OCR_MAX_TEXT_WIDTH = 560


def _text_lines(rng: random.Random, font: Any) -> list[str]:
    lines = []
    for _ in range(1 + int(rng.random() * 2)):
        words: list[str] = []
        for _ in range(rng.randint(2, 4)):
            word = OCR_WORDS[int(rng.random() * len(OCR_WORDS))]
            if words and font.getlength(" ".join([*words, word])) > OCR_MAX_TEXT_WIDTH:
                break
            words.append(word)
        lines.append(" ".join(words))
    return lines


def _text_image(lines: list[str], size: int, rng: random.Random) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    step = int(size * 1.8)
    img = Image.new("RGB", (OCR_WIDTH, 40 + step * len(lines)), "white")
    draw = ImageDraw.Draw(img)
    left = 20 + int(rng.random() * 20)
    for i, line in enumerate(lines):
        draw.text((left, 20 + i * step), line, fill="black", font=font)
    return img


def seed_ocr_demo(store: Store, media_dir: str | Path, tasks: int = 24, seed: int = 0) -> dict[str, Any]:
    """An inference-method demo for the OCR pre-processor: `tasks` data units (spec `image_1`), each
    an image of one or two lines of words, one pending task each, plus the `ocr` plugin release.

    Deterministic from `seed` (except the ids). `truth` is `{task_id: "line 1\\nline 2"}`: the
    lines top to bottom, as the reader returns them."""
    if tasks < 0:
        raise ValueError("tasks must be >= 0")
    from PIL import ImageFont

    media_dir = Path(media_dir)
    release = release_id(store, "ocr")
    rng = random.Random(seed)
    project_id, dc_id, rel_dir = inference_project(store, "ocr", "OCR", tasks, seed)
    units: list[dict[str, Any]] = []
    truths: list[str] = []
    for i in range(tasks):
        size = OCR_FONT_SIZES[int(rng.random() * len(OCR_FONT_SIZES))]
        lines = _text_lines(rng, ImageFont.load_default(size=size))
        rel = f"{rel_dir}/text_{i:05d}.png"
        save_image(_text_image(lines, size, rng), media_dir / rel, jpeg_quality=92)
        truths.append("\n".join(lines))
        units.append(
            {
                "meta": {"index": i, "font_size": size, "text": truths[-1]},
                "files": {
                    "image_1": {"path": rel, "file_name_original": f"text_{i:05d}.png", "is_primary": True}
                },
            }
        )
    counts = {
        "one_line": sum(1 for t in truths if "\n" not in t),
        "two_lines": sum(1 for t in truths if "\n" in t),
        "words": sum(len(t.split()) for t in truths),
    }
    return inference_demo_answer(
        store, "ocr", seed, project_id, dc_id, units, truths, counts, release, OCR_PARAMS
    )
