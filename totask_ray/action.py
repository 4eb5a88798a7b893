"""`ToTask`: the class users subclass, with the Synapse SDK's ToTask hook signatures.

A Synapse plugin ports by changing its import: the hooks keep their names, arguments and return
types. Hooks may be plain functions (they run in a worker thread, many at a time) or `async def`
(they run on the worker's event loop). When `convert_data_from_file` is not overridden, the workers
use an async download path that does the same thing without a thread per task.

This module is the contract a plugin writes against, so it imports nothing of the run: a plugin is
run by `totask_ray.run_to_task(params, action_cls=MyToTask)` or `totask-ray run --plugin`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from totask_ray import annotation
from totask_ray.net.downloads import DEFAULT_MAX_JSON_BYTES, UrlPolicy, fetch_json_sync
from totask_ray.params import ToTaskParams


class RuntimeContext:
    """`context.runtime_ctx`, as SDK plugins reach it: `logger`, `env` and `client`."""

    def __init__(self, logger: logging.Logger, client_factory: Callable[[], Any] | None) -> None:
        self.logger = logger
        self.env: dict[str, str] = dict(os.environ)
        self._client_factory = client_factory
        self._client: Any = None

    @property
    def client(self) -> Any:
        """A blocking platform client (made on first use, in the annotator's process)."""
        if self._client is None:
            if self._client_factory is None:
                raise RuntimeError("no platform client here: the context is used outside a run")
            self._client = self._client_factory()
        return self._client


class PluginContext:
    """`self.context` in a hook: what SDK plugins use of the Synapse `ToTaskContext`.

    `params` (the action's params, flattened, with Synapse names), `logger`, `client` (a blocking
    platform client), `runtime_ctx` (`logger`, `env`, `client`), `inference` (`code`, `version`,
    `config`, `max_batch_size` of the pre-processor), `batch_size`, `data_collection`, and the
    step context's `log(event, data)`, `set_progress(...)` and `set_metrics(...)`, which go to the
    worker's log here: the driver owns the job's progress and metrics records.
    """

    def __init__(
        self,
        params: ToTaskParams | None,
        *,
        client_factory: Callable[[], Any] | None = None,
        inference: dict[str, Any] | None = None,
        data_collection: int | None = None,
    ) -> None:
        self.params: dict[str, Any] = params.to_synapse() if params is not None else {}
        self.logger = logging.getLogger("totask_ray.plugin")
        self.runtime_ctx = RuntimeContext(self.logger, client_factory)
        self.inference = inference
        self.batch_size = params.batch_size if params is not None else None
        self.data_collection = data_collection

    @property
    def client(self) -> Any:
        return self.runtime_ctx.client

    def log(self, event: str, data: Any = None) -> None:
        self.logger.info("%s: %s", event, data)

    def set_progress(self, current: int, total: int, step: str | None = None) -> None:
        self.logger.debug("progress %s/%s (%s)", current, total, step)

    def set_metrics(self, value: Any, step: str | None = None) -> None:
        self.logger.debug("metrics %s (%s)", value, step)


class ToTask:
    """Pre-annotate tasks from files or from a pre-processor. Subclass it to convert your formats."""

    action_name = "to_task"

    def __init__(self, params: ToTaskParams | dict[str, Any] | None = None):
        self.params: ToTaskParams | None = ToTaskParams.parse(params) if params is not None else None
        self.url_policy: UrlPolicy = UrlPolicy()
        self.max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
        self.context: PluginContext = PluginContext(self.params)

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
        """Return the pre-processor's response as the task's data (the Synapse SDK's template).

        `inference_data` is the pre-processor's response for this task: task-compatible data
        (`{"objects": [...]}`) from totask-ray's own apps and from any app that follows the
        Synapse user guide, with the model's labels already mapped to the project's classes. A
        list of detections (`[{bbox|polygon, class_id, label, score}]`) is turned into objects,
        for apps that answer with detections. What is returned is validated before it is written.
        """
        if isinstance(inference_data, list):
            return annotation.detections_to_task_data(inference_data)
        if isinstance(inference_data, dict) and isinstance(inference_data.get("detections"), list):
            return annotation.detections_to_task_data(inference_data["detections"])
        return inference_data

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
        """The parameters the pre-processor receives for this task.

        Return either the parameters themselves, or the Synapse SDK's request shape
        `{"model": ..., "method": "post", "json": {"image_path": url, ...parameters}}`: its `json`
        (less `image_path`, which is always the task's primary file) is what the app receives and
        its `model` selects the model. Override to add per-task parameters.
        """
        params = dict(pre_processor_params)
        if model_id is not None:
            params.setdefault("model", model_id)
        return params

    # -- helpers for the workers -------------------------------------------------------------------

    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(ToTask, hook)
