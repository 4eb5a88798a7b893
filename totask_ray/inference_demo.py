"""The inference demos run by `totask-ray demo --method inference`: faces, then OCR.

Both pre-processors ship inside wheels (OpenCV's Haar cascade, RapidOCR's PP-OCR models), so the
demo deploys them on the local Ray without downloading anything.
"""

from __future__ import annotations

from typing import Any

RUN = {"serve_poll_interval_s": 1.0}


def _params(name: str, threshold: float) -> Any:
    def make(seeded: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "project": seeded["project"],
            "method": "inference",
            "pre_processor": seeded["pre_processor"],
            "pre_processor_params": seeded.get("pre_processor_params") or {"confidence_threshold": threshold},
            "batch_size": 8,
        }

    return make


def inference_demo_runs() -> list[tuple[str, Any, dict[str, Any]]]:
    """(demo seeder name, params from its seeded ids, run options) for each demo run."""
    return [
        ("faces", _params("Demo_Faces", 0.5), RUN),
        ("ocr", _params("Demo_OCR", 0.5), RUN),
    ]
