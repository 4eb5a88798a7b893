"""`ToTask`: the class users subclass, with the Synapse SDK's ToTask hook signatures.

A Synapse plugin ports by changing its import: the hooks keep their names, arguments and return
types. Hooks may be plain functions (they run in a worker thread, many at a time) or `async def`
(they run on the worker's event loop). When `convert_data_from_file` is not overridden, the workers
use an async download path that does the same thing without a thread per task.

This module is the contract a plugin writes against, so it imports nothing of the run: a plugin is
run by `totask_ray.run_to_task(params, action_cls=MyToTask)` or `totask-ray run --plugin`.
"""

from __future__ import annotations

from typing import Any

from totask_ray import annotation
from totask_ray.net.downloads import DEFAULT_MAX_JSON_BYTES, UrlPolicy, fetch_json_sync
from totask_ray.params import ToTaskParams


class ToTask:
    """Pre-annotate tasks from files or from a pre-processor. Subclass it to convert your formats."""

    action_name = "to_task"

    def __init__(self, params: ToTaskParams | dict[str, Any] | None = None):
        self.params: ToTaskParams | None = ToTaskParams.parse(params) if params is not None else None
        self.url_policy: UrlPolicy = UrlPolicy()
        self.max_json_bytes: int = DEFAULT_MAX_JSON_BYTES

    # -- hooks (Synapse SDK signatures) ------------------------------------------------------------

    def convert_data_from_file(
        self,
        primary_file_url: str,
        primary_file_name: str | None,
        data_file_url: str,
        data_file_name: str | None,
        task_data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Download the annotation JSON and return it as the task's data.

        The download is checked (http/https only, no private targets unless allowed, a size cap,
        content type, UTF-8, strict JSON); what is returned is validated before it is written.
        """
        return fetch_json_sync(data_file_url, self.url_policy, max_bytes=self.max_json_bytes)

    def convert_data_from_inference(
        self, inference_data: Any, task_data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Map a pre-processor's detections to task-data objects (bbox, or polygon when given).

        `inference_data` is the list of detections for one image, as the pre-processor returned
        them after `confidence_threshold`, `class_filter`, `max_objects` and `min_object_size`
        were applied. Scores are kept as `properties.confidence`; OCR text as `properties.text`.
        """
        if not inference_data:
            return {}
        detections = inference_data.get("detections") if isinstance(inference_data, dict) else inference_data
        objects = []
        for i, det in enumerate(detections or []):
            props: dict[str, Any] = {}
            if det.get("text") is not None:
                props["text"] = det["text"]
            common = {"label": det.get("label"), "confidence": det.get("score"), **props}
            oid = f"obj_{i + 1:03d}"
            if det.get("polygon"):
                objects.append(annotation.polygon(oid, int(det.get("class_id", 0)), det["polygon"], **common))
            else:
                x, y, w, h = det["bbox"]
                objects.append(annotation.bbox(oid, int(det.get("class_id", 0)), x, y, w, h, **common))
        # `task_data` is the hook's parameter (the Synapse signature), so the factory is reached via its module
        return annotation.task_data(objects) if objects else {}

    def setup_inference_params(
        self,
        primary_file_url: str,
        primary_file_name: str | None,
        data_files: dict[str, Any],
        *,
        model_id: int | None,
        pre_processor_params: dict[str, Any],
        pre_processor_config: dict[str, Any],
        task_data: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The parameters the pre-processor receives for this task (Synapse: the request's `json`).

        Override to add per-task parameters; what you return is what the app receives for this task.
        """
        params = dict(pre_processor_params)
        if model_id is not None:
            params.setdefault("model", model_id)
        return params

    # -- helpers for the workers -------------------------------------------------------------------

    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(ToTask, hook)
