"""Demo projects for the embedded platform, by name in `DEMOS`, built from images inside wheels.

- `files`: the file method's demo, annotation JSON files next to shared sample pictures;
- `faces`, `ocr`: the inference method's demos, one composed picture per task with a known answer,
  so that a run can be scored, not just counted.

`POST /_local/seed/` and `totask-ray platform seed` call them by name. Each demo module imports the
registry and registers nothing itself; the registration is here, in one place, so that the order
the demos are listed in does not hang on the order of imports.
"""

from __future__ import annotations

from .faces import FACE_BOX, FACES_PARAMS, iou, match_faces, seed_faces_demo
from .files import SAMPLE_IMAGES, make_annotation, seed_files_demo, write_sample_images
from .ocr import OCR_PARAMS, seed_ocr_demo
from .registry import DEMOS, FIRST_DAY, release_config

__all__ = [
    "DEMOS",
    "FACES_PARAMS",
    "FACE_BOX",
    "FIRST_DAY",
    "OCR_PARAMS",
    "SAMPLE_IMAGES",
    "iou",
    "make_annotation",
    "match_faces",
    "release_config",
    "seed_faces_demo",
    "seed_files_demo",
    "seed_ocr_demo",
    "write_sample_images",
]

DEMOS.update(files=seed_files_demo, faces=seed_faces_demo, ocr=seed_ocr_demo)
