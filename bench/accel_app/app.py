"""A model that behaves like one on an accelerator, for `python -m bench accelerator`.

A batch costs `FIXED_S + PER_IMAGE_S * len(batch)` and is waited out with `time.sleep` in the
replica's model thread, so it burns no CPU, like a kernel running on a GPU; one batch at a time per
replica, as a GPU runs one. Each replica appends its busy intervals to a file under
`$TOTASK_ACCEL_DIR`, so the bench can tell how much of the run each replica was busy.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from totask_ray.serving.deployment import build_application
from totask_ray.serving.interface import Detection, PreProcessorSpec
from totask_ray.serving.params import CommonParams, InferenceParams

CONFIG_PATH = Path(__file__).with_name("config.yaml")
FIXED_S = 0.040
PER_IMAGE_S = 0.001
SPEC = PreProcessorSpec(name="accel", labels={0: "thing"}, params=CommonParams, devices=("cpu", "cuda"))


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    return build_application(AcceleratorShapedModel, CONFIG_PATH, args, name="AcceleratorShaped")


class AcceleratorShapedModel:
    def __init__(self, *, log_dir: str | None = None, threads: int | None = None) -> None:
        self._lock = threading.Lock()  # one batch at a time, as on one device
        where = log_dir or os.environ.get("TOTASK_ACCEL_DIR") or "/tmp/totask-accel"
        Path(where).mkdir(parents=True, exist_ok=True)
        self._log = Path(where) / f"replica-{os.getpid()}.jsonl"

    @property
    def spec(self) -> PreProcessorSpec:
        return SPEC

    def detect(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]:
        with self._lock:
            start = time.time()
            time.sleep(FIXED_S + PER_IMAGE_S * len(images))
            end = time.time()
        self._log.parent.mkdir(parents=True, exist_ok=True)  # the bench clears it between runs
        with open(self._log, "a") as fh:
            fh.write(json.dumps({"start": start, "end": end, "n": len(images)}) + "\n")
        out = []
        for img in images:
            h, w = img.shape[:2]
            out.append(
                [Detection(label="thing", class_id=0, score=0.9, bbox=(w * 0.25, h * 0.25, w * 0.5, h * 0.5))]
            )
        return out
