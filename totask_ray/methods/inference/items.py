"""What a task carries to the model: its params and model (split from what
`setup_inference_params` returned) and, batched, its image (the file's bytes, or decoded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from totask_ray.net.images import EncodedImage
from totask_ray.pipeline.annotator import TaskFailed
from totask_ray.pipeline.outcomes import Stage
from totask_ray.platform.models import Task


@dataclass
class CallCounts:
    """What one pre-processor call cost beyond its first try (`callers`); it reaches the run's
    result through its first task's outcome."""

    retries: int = 0  # tries sent again after an infrastructure fault
    backoffs: int = 0  # tries refused by a full queue and sent again after a back-off


@dataclass
class Ready:
    """A task whose params are known (and, batched, whose image is fetched): waiting for the model."""

    task: Task
    url: str
    # batched: the file's bytes checked from its header (or decoded, where the app's spec asks for
    # arrays); synapse: None, the app fetches `image_path` itself
    image: EncodedImage | np.ndarray | None
    params: dict[str, Any]
    model: Any
    key: str
    counts: CallCounts | None = field(default=None, compare=False)  # its call's cost (first task of a call)


def split_request(returned: Any, default_model: Any) -> tuple[dict[str, Any], Any]:
    """`setup_inference_params`'s answer as (the app's params, the model): either the params
    themselves, or the Synapse SDK's request `{"model", "method", "json": {"image_path", ...}}`."""
    if not isinstance(returned, dict):
        raise TaskFailed(Stage.CONVERT, "setup_inference_params must return a dict of parameters")
    if isinstance(returned.get("json"), dict) and set(returned) <= {"model", "method", "json"}:
        method = str(returned.get("method", "post")).lower()
        if method != "post":
            raise TaskFailed(
                Stage.CONVERT, f"setup_inference_params asked for method '{method}'; only post is sent"
            )
        params = {k: v for k, v in returned["json"].items() if k != "image_path"}
        return params, returned.get("model", default_model)
    params = dict(returned)
    return params, params.pop("model", default_model)
