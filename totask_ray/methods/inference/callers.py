"""How a batch's tasks reach the pre-processor: one caller per calling convention.

The annotator builds one when it starts, from the convention prepare settled on, and hands it each
batch's ready tasks; the caller pairs each task with the app's answer (task data, or the
`TaskFailed` saying why not). Both call through the app's `DeploymentHandle` and retry a failed
call once.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

from totask_ray.annotation import detections_to_task_data
from totask_ray.methods.inference.auth import multiplexed_model_id
from totask_ray.methods.inference.items import Ready
from totask_ray.methods.inference.release import import_attr
from totask_ray.pipeline.annotator import TaskFailed, safe_error
from totask_ray.pipeline.outcomes import Stage

log = logging.getLogger("totask_ray")


class Caller(ABC):
    """Calls the app for a batch's ready tasks through `handle`, each call given `timeout_s`."""

    needs_image = False  # whether the annotator downloads and decodes each task's image for it

    def __init__(self, handle: Any, timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    @abstractmethod
    async def answer(self, ready: list[Ready]) -> list[tuple[Ready, Any]]:
        """Each task with the app's answer for it, or the `TaskFailed` saying why there is none."""

    async def _call(self, make: Any, what: str, problem: Any = None) -> Any:
        """One handle call, retried once; the answer, or a `TaskFailed` saying why not. `problem`
        (answer -> error text or None) marks an answer of the wrong shape as a failed attempt."""
        last_error = ""
        for attempt in (1, 2):
            response = make()
            try:
                answer = await asyncio.wait_for(response, timeout=self.timeout_s)
                wrong = problem(answer) if problem is not None else None
                if wrong is None:
                    return answer
                last_error = wrong
            except TimeoutError:
                response.cancel()
                last_error = f"the pre-processor did not answer within {self.timeout_s:g} s"
            except Exception as exc:
                last_error = f"the pre-processor failed: {safe_error(exc)}"
            log.debug("%s attempt %d failed: %s", what, attempt, last_error)
        return TaskFailed(Stage.CONVERT, last_error)


class BatchedCaller(Caller):
    """*batched* (totask-ray's own protocol): the image is downloaded and decoded by the annotator
    and the app's `predict(images, params)` is called once per batch (per distinct params); its
    detections are turned into task data here."""

    needs_image = True

    async def answer(self, ready: list[Ready]) -> list[tuple[Ready, Any]]:
        groups: dict[str, list[Ready]] = {}
        for item in ready:
            groups.setdefault(item.key, []).append(item)
        return [
            pair for group in await asyncio.gather(*map(self._infer_group, groups.values())) for pair in group
        ]

    async def _infer_group(self, group: list[Ready]) -> list[tuple[Ready, Any]]:
        """One `predict` call for the whole group; its detections as task data, one per task."""
        from totask_ray.serving.interface import PreProcessorOutputError
        from totask_ray.serving.params import InferenceParams
        from totask_ray.serving.postprocess import apply_params, detections_to_dicts
        from totask_ray.serving.validation import validate_output

        images = [item.image for item in group]
        params = group[0].params

        def problem(answer: Any) -> str | None:
            if isinstance(answer, list) and len(answer) == len(group):
                return None
            return (
                f"the pre-processor returned {type(answer).__name__} instead of one detection list per image "
                f"({len(group)})"
            )

        answer = await self._call(lambda: self.handle.predict.remote(images, params), "batch call", problem)
        if isinstance(answer, TaskFailed):
            return [(item, answer) for item in group]
        out: list[tuple[Ready, Any]] = []
        for item, detections in zip(group, answer, strict=True):
            try:
                valid = validate_output([item.image], [detections])[0]
                kept = apply_params(valid, InferenceParams.model_validate(item.params))
            except PreProcessorOutputError as exc:
                out.append(
                    (item, TaskFailed(Stage.VALIDATE, f"the pre-processor's output is invalid: {exc}"))
                )
                continue
            except ValueError as exc:
                out.append(
                    (item, TaskFailed(Stage.CONVERT, f"invalid inference parameters: {safe_error(exc)}"))
                )
                continue
            out.append((item, detections_to_task_data(detections_to_dicts([kept])[0])))
        return out


class SynapseCaller(Caller):
    """*synapse*: the app's own route (`POST /` with `{"image_path": url, ...params}`, found at
    prepare as `route`, its body validated by `body_model` when it takes one) is called through its
    deployment handle, one request per task with all of a batch in flight, so the app's
    `@serve.batch` merges them, with Serve's multiplexed model id set from `model`; its response is
    the task's `inference_data`, as in Synapse."""

    def __init__(
        self, handle: Any, timeout_s: float, route: str | None, body_model: str | None, platform: Any
    ) -> None:
        super().__init__(handle, timeout_s)
        self.platform = platform
        self._route, _, self._body_param = (route or "__call__").partition(":")
        self._body_model = import_attr(body_model) if body_model else None
        self._model_ids: dict[str, str] = {}

    async def answer(self, ready: list[Ready]) -> list[tuple[Ready, Any]]:
        results = await asyncio.gather(*(self._call_route(item) for item in ready))
        return list(zip(ready, results, strict=True))

    async def _call_route(self, item: Ready) -> Any:
        body: Any = {"image_path": item.url, **item.params}
        if self._body_model is not None:
            try:
                body = self._body_model.model_validate(body)
            except Exception as exc:
                return TaskFailed(
                    Stage.CONVERT, f"the pre-processor refuses these parameters: {safe_error(exc)}"
                )
        handle = self.handle.options(multiplexed_model_id=self._model_id(item.model))
        method = getattr(handle, self._route)
        if self._body_param:
            answer = await self._call(lambda: method.remote(**{self._body_param: body}), "inference request")
        else:
            answer = await self._call(lambda: method.remote(body), "inference request")
        if hasattr(answer, "model_dump"):
            answer = answer.model_dump(mode="json")
        return answer

    def _model_id(self, model: Any) -> str:
        key = str(model)
        if key not in self._model_ids:
            self._model_ids[key] = multiplexed_model_id(model, self.platform)
        return self._model_ids[key]
