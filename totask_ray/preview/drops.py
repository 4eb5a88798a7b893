"""What the model found on the sample that would not be written, and why.

The run filters a model's detections in two places, and neither keeps count: `apply_params`
(confidence threshold, class filter, minimum size, NMS, `max_objects`; `serving/postprocess.py`)
and the label mapping under `unmapped_labels: drop` (`methods/labels.py`). Rather than thread
counters through both (and through the Serve replicas), the preview asks the pre-processor once
more for the sample's images with those filters off, then applies the same two functions stage by
stage, counting what each stage removes. The objects a preview shows as written come from the
dry run itself, not from this; this only explains the difference.

Counted for the *batched* calling convention (the apps built on `serving/deployment.py`, which
take `predict(images, params)`), with the job's `pre_processor_params` (a plugin's
`setup_inference_params` may change them per task: not replayed here).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from totask_ray.annotation import detections_to_task_data
from totask_ray.methods.labels import LabelMapping
from totask_ray.net.images import ImageDecodeError, sniff_image
from totask_ray.params import ToTaskParams
from totask_ray.platform.base import Platform

# The common params that drop detections, in `apply_params`'s order, and what the page calls them.
STAGES: tuple[tuple[str, str], ...] = (
    ("confidence_threshold", "below the confidence threshold"),
    ("class_filter", "not in class_filter"),
    ("min_object_size", "smaller than min_object_size"),
    ("nms_threshold", "overlap (NMS)"),
    ("max_objects", "over max_objects"),
)
UNMAPPED = "unmapped label (unmapped_labels: drop)"
_RELAXED_KEYS = ("threshold", "confidence_threshold", "class_filter", "min_object_size", "nms_threshold",
                 "max_objects", "post_processing")  # fmt: skip


@dataclass
class Drops:
    """Per reason, per model label: how many detections were dropped on the sample."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    below_threshold: dict[str, list[float]] = field(default_factory=dict)  # scores, by model label
    threshold: float | None = None
    note: str = ""  # why nothing was counted, when nothing was
    call_s: float | None = None  # the pre-processor's answer to the probe's one batch call
    call_images: int = 0

    def rows(self) -> list[tuple[str, str, int]]:
        order = [reason for _, reason in STAGES] + [UNMAPPED]
        return sorted(
            ((reason, label, n) for (reason, label), n in self.counts.items()),
            key=lambda r: (order.index(r[0]), r[1]),
        )


def count_drops(
    params: ToTaskParams,
    client: Platform,
    images: Sequence[bytes],
    *,
    convention: str | None = None,
    timeout_s: float = 120.0,
) -> Drops:
    """Drops on `images` (the sample's primary images, decodable ones) for an inference job."""
    from totask_ray.serving.config import PreProcessorRelease, parse_release_config
    from totask_ray.serving.params import InferenceParams

    if params.pre_processor is None:
        return Drops(note="the file method writes the converted annotation as it is: nothing is filtered")
    raw = client.get_plugin_release(params.pre_processor)
    release = PreProcessorRelease.from_config(
        parse_release_config(raw.config, source=f"plugin release {raw.id}"), id=raw.id
    )
    if (convention or release.convention) != "batched":
        return Drops(
            note="not counted: the pre-processor is called by the Synapse convention, which filters inside the app"
        )
    encoded = []
    for body in images:  # as the annotator sends them: checked from the header, decoded on the replica
        with contextlib.suppress(ImageDecodeError):
            encoded.append(sniff_image(body))
    if not encoded:
        return Drops(note="not counted: no image of the sample could be read")
    full = InferenceParams.model_validate(params.pre_processor_params)
    relaxed = {k: v for k, v in params.pre_processor_params.items() if k not in _RELAXED_KEYS}
    from ray import serve

    handle = serve.get_app_handle(release.app_name)
    t0 = time.perf_counter()
    answers = handle.predict.remote(encoded, relaxed).result(timeout_s=timeout_s)
    call_s = time.perf_counter() - t0
    project = client.get_project(params.project)
    mapping = LabelMapping.build(project.classes, None, params.label_map, params.unmapped_labels)
    drops = Drops(threshold=full.confidence_threshold or None, call_s=call_s, call_images=len(encoded))
    for answer in answers:
        if isinstance(answer, list):
            _count_one(answer, full, mapping, drops)
    return drops


def _count_one(answer: list[dict[str, Any]], full: Any, mapping: LabelMapping | None, drops: Drops) -> None:
    from totask_ray.serving.interface import Detection
    from totask_ray.serving.params import InferenceParams
    from totask_ray.serving.postprocess import apply_params, detections_to_dicts

    found = [Detection.model_validate(d) for d in answer]
    values = {
        "confidence_threshold": full.confidence_threshold,
        "class_filter": full.class_filter,
        "min_object_size": full.min_object_size,
        "nms_threshold": full.iou_threshold,
        "max_objects": full.max_objects,
    }
    before = found
    upto: dict[str, Any] = {}
    for key, reason in STAGES:
        upto[key] = values[key]
        after = apply_params(found, InferenceParams.model_validate(upto))
        for label, n in (Counter(d.label for d in before) - Counter(d.label for d in after)).items():
            drops.counts[(reason, str(label))] += n
        if key == "confidence_threshold":
            for d in before:
                if d.score < full.confidence_threshold:
                    drops.below_threshold.setdefault(str(d.label), []).append(float(d.score))
        before = after
    if mapping is not None and mapping.drop_unmapped:
        data = detections_to_task_data(detections_to_dicts([before])[0])
        kept = {o["id"] for o in mapping.apply(data)["objects"]}  # the run's own mapping decides
        for obj in data["objects"]:
            if obj["id"] not in kept:
                drops.counts[(UNMAPPED, str(obj["properties"].get("label")))] += 1
