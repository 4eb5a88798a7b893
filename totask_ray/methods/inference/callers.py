"""How a batch's tasks reach the pre-processor: one caller per calling convention.

The annotator builds one when it starts, from the convention prepare settled on, and hands it each
batch's ready tasks; the caller pairs each task with the app's answer (task data, or the
`TaskFailed` saying why not). Both call through the app's `DeploymentHandle`.

Flow control (issue 25): what goes wrong with a call is one of three things, each handled apart.
- *Back-pressure*: the app's queue is full (Serve's `BackPressureError`, `max_queued_requests`).
  Nothing ran: the call is sent again for as long as `backpressure_s` allows, and counted
  (`backoffs`). It waits until one of this caller's own calls moves on (reaches a replica, or ends),
  or at most a back-off (jittered, doubling to `max_backoff_s`). Serve counts the queue per handle,
  so a refused call's place is held by this caller's own queued call, and frees when that one
  reaches a replica: a blind back-off alone slept past it (up to 2 s) while the replica idled, and 10x
  overloaded the replica's throughput fell to 0.84x of the same callers not overloaded (issue 25).
- *An infrastructure fault*: the replica died or moved, its node or an object was lost
  (`TRANSIENT`), or the model never started within `queue_limit_s`. The call is sent again up to
  `faults` times, after a back-off, and counted (`retries`): a batch does not become a permanent
  task failure while that budget lasts.
- *The model's own failure*: it raised, answered in the wrong shape or took longer than the call
  timeout. Retried once, as before, then the batch's tasks fail with the reason.

The call timeout measures the model's time, not the queue's. Batched: the replica's
`predict_timed` is a stream whose first item (`STARTED`) comes when the batch has the model to
itself (`serving/batch_entry.py`); the timeout starts then. Synapse (an app's own route, which
marks nothing): the timeout starts once Serve has assigned the request to a replica
(`DeploymentResponse._to_object_ref`), so the callers' router queues do not count; a replica's own
queue (bounded by its `max_ongoing_requests`) still does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray.exceptions as ray_errors
from ray.serve.exceptions import BackPressureError

from totask_ray.annotation import detections_to_task_data
from totask_ray.methods.inference.auth import multiplexed_model_id
from totask_ray.methods.inference.items import CallCounts, Ready
from totask_ray.methods.inference.release import import_attr
from totask_ray.pipeline.annotator import TaskFailed, safe_error
from totask_ray.pipeline.outcomes import Stage

log = logging.getLogger("totask_ray")

# Faults of the cluster, not of the model: the same call can succeed on another try (Serve brings
# up a replica in place of a dead one; a lost object is made again).
TRANSIENT: tuple[type[BaseException], ...] = (
    ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError: the replica died or is unreachable
    ray_errors.ObjectLostError,
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.OutOfMemoryError,  # the replica was killed by the memory monitor
)


@dataclass(frozen=True)
class RetryBudget:
    """How long one call keeps trying through back-pressure and faults (see the module's doc)."""

    faults: int = 5  # infrastructure faults retried per call
    backpressure_s: float = 600.0  # how long a call keeps backing off a full queue
    first_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    # How long a call may wait for the model to start (queued), as a multiple of the call timeout:
    # past it the wait counts as a fault (a replica that never takes the call), not a model timeout.
    queue_limit_factor: float = 10.0

    def backoff(self, n: int) -> float:
        """The pause before the `n`th (1-based) new try: doubling, jittered (callers spread out)."""
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (n - 1)) * random.uniform(0.5, 1.0)


class QueueWaitExceeded(Exception):
    """The model did not start on the call within the queue limit."""


class Caller(ABC):
    """Calls the app for a batch's ready tasks through `handle`; the model gets `timeout_s` a call."""

    needs_image = False  # whether the annotator downloads each task's image for it
    decode = False  # whether the annotator decodes it too (the payload is arrays, not the file's bytes)

    def __init__(self, handle: Any, timeout_s: float, budget: RetryBudget | None = None) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.budget = budget or RetryBudget()
        self._moved: asyncio.Event | None = None  # set when one of this caller's calls moves on

    def _moved_on(self) -> None:
        """One of this caller's calls reached a replica or ended: wake the calls backing off."""
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    async def _back_off(self, pause_s: float) -> None:
        """Wait ``pause_s``, or less: until one of this caller's calls moves on."""
        if self._moved is None:
            self._moved = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._moved.wait(), timeout=pause_s)

    @property
    def queue_limit_s(self) -> float:
        return self.timeout_s * self.budget.queue_limit_factor

    @abstractmethod
    async def answer(self, ready: list[Ready]) -> list[tuple[Ready, Any]]:
        """Each task with the app's answer for it, or the `TaskFailed` saying why there is none; the
        first task of each call carries that call's `CallCounts` (`Ready.counts`)."""

    @abstractmethod
    async def _attempt(self, make: Callable[[], Any]) -> Any:
        """One try: the answer; `QueueWaitExceeded` or `TimeoutError` where a limit ran out."""

    async def _call(self, make: Callable[[], Any], what: str, problem: Any = None) -> tuple[Any, CallCounts]:
        """One handle call through back-pressure, faults and one retry of a model failure (the
        module's doc); the answer, or a `TaskFailed` saying why not, and what it cost. `problem`
        (answer -> error text or None) marks an answer of the wrong shape as a failed try."""
        counts, budget = CallCounts(), self.budget
        model_failures, backed_off_s, last_error = 0, 0.0, ""
        while True:
            try:
                answer = await self._attempt(make)
            except BackPressureError as exc:  # nothing of this call moved: no wake-up for the others
                counts.backoffs += 1
                if backed_off_s >= budget.backpressure_s:
                    return TaskFailed(
                        Stage.CONVERT,
                        f"the pre-processor's queue stayed full for {backed_off_s:.0f} s ({exc}); "
                        "give it more replicas or run fewer annotators",
                    ), counts
                started = asyncio.get_running_loop().time()
                await self._back_off(budget.backoff(counts.backoffs))
                backed_off_s += asyncio.get_running_loop().time() - started
                continue
            except (QueueWaitExceeded, *TRANSIENT) as exc:
                self._moved_on()
                counts.retries += 1
                last_error = (
                    f"the pre-processor did not start on the call within {self.queue_limit_s:g} s"
                    if isinstance(exc, QueueWaitExceeded)
                    else f"the pre-processor was lost: {safe_error(exc)}"
                )
                log.info("%s: %s; trying again (%d of %d)", what, last_error, counts.retries, budget.faults)
                if counts.retries > budget.faults:
                    return TaskFailed(Stage.CONVERT, f"{last_error} ({budget.faults} retries spent)"), counts
                await asyncio.sleep(budget.backoff(counts.retries))
                continue
            except TimeoutError:
                last_error = f"the pre-processor did not answer within {self.timeout_s:g} s"
            except Exception as exc:
                last_error = f"the pre-processor failed: {safe_error(exc)}"
            else:
                self._moved_on()
                wrong = problem(answer) if problem is not None else None
                if wrong is None:
                    return answer, counts
                last_error = wrong
            model_failures += 1
            log.debug("%s try %d failed: %s", what, model_failures, last_error)
            if model_failures >= 2:
                return TaskFailed(Stage.CONVERT, last_error), counts


async def _limited(awaitable: Any, limit_s: float, on_timeout: Callable[[], None]) -> Any:
    """`awaitable` within `limit_s`; on running out `on_timeout()` (cancel the call) and TimeoutError."""
    try:
        return await asyncio.wait_for(awaitable, timeout=limit_s)
    except TimeoutError:
        on_timeout()
        raise


class BatchedCaller(Caller):
    """*batched* (totask-ray's own protocol): the image is downloaded and checked by the annotator
    and the app's `predict_timed(images, params)` is called once per batch (per distinct params); its
    detections are turned into task data here. The images travel as the files' bytes
    (`EncodedImage`) and are decoded on the replica, unless the app's spec asks for arrays
    (`PreProcessorSpec.payload = "decoded"`: `decode`)."""

    needs_image = True

    def __init__(
        self, handle: Any, timeout_s: float, payload: str = "encoded", budget: RetryBudget | None = None
    ) -> None:
        super().__init__(handle, timeout_s, budget)
        self.decode = payload == "decoded"

    async def _attempt(self, make: Callable[[], Any]) -> Any:
        from totask_ray.serving.batch_entry import STARTED

        stream = make()

        async def started() -> Any:
            # Serve's router hands the call to a replica before the model starts on it (the replica
            # holds `max_ongoing_requests`): from then its place in this caller's queue is free.
            assigned = getattr(stream, "_fetch_future_result_async", None)  # private: may go
            if assigned is not None:
                await assigned()
                self._moved_on()
            return await anext(stream)

        try:
            first = await _limited(started(), self.queue_limit_s, stream.cancel)
        except TimeoutError:
            raise QueueWaitExceeded() from None
        self._moved_on()
        if first != STARTED:
            raise ValueError(f"predict_timed's first item was {type(first).__name__}, not {STARTED!r}")
        return await _limited(anext(stream), self.timeout_s, stream.cancel)

    async def answer(self, ready: list[Ready]) -> list[tuple[Ready, Any]]:
        groups: dict[str, list[Ready]] = {}
        for item in ready:
            groups.setdefault(item.key, []).append(item)
        return [
            pair for group in await asyncio.gather(*map(self._infer_group, groups.values())) for pair in group
        ]

    async def _infer_group(self, group: list[Ready]) -> list[tuple[Ready, Any]]:
        """One `predict_timed` call for the whole group; its detections as task data, one per task."""
        from totask_ray.serving.batch_entry import image_error
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

        streaming = self.handle.options(stream=True)
        answer, group[0].counts = await self._call(
            lambda: streaming.predict_timed.remote(images, params), "batch call", problem
        )
        if isinstance(answer, TaskFailed):
            return [(item, answer) for item in group]
        out: list[tuple[Ready, Any]] = []
        for item, detections in zip(group, answer, strict=True):
            undecodable = image_error(detections)
            if undecodable is not None:
                out.append((item, TaskFailed(Stage.CONVERT, f"the primary file {undecodable}")))
                continue
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
        self,
        handle: Any,
        timeout_s: float,
        route: str | None,
        body_model: str | None,
        platform: Any,
        budget: RetryBudget | None = None,
    ) -> None:
        super().__init__(handle, timeout_s, budget)
        self.platform = platform
        self._route, _, self._body_param = (route or "__call__").partition(":")
        self._body_model = import_attr(body_model) if body_model else None
        self._model_ids: dict[str, str] = {}

    async def _attempt(self, make: Callable[[], Any]) -> Any:
        response = make()
        try:
            # assigned to a replica: the wait in the caller's router is not the model's time
            ref = await _limited(response._to_object_ref(), self.queue_limit_s, response.cancel)
        except TimeoutError:
            raise QueueWaitExceeded() from None
        self._moved_on()  # on a replica: its place in this caller's queue is free
        return await _limited(ref, self.timeout_s, response.cancel)

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
            answer, item.counts = await self._call(
                lambda: method.remote(**{self._body_param: body}), "inference request"
            )
        else:
            answer, item.counts = await self._call(lambda: method.remote(body), "inference request")
        if hasattr(answer, "model_dump"):
            answer = answer.model_dump(mode="json")
        return answer

    def _model_id(self, model: Any) -> str:
        key = str(model)
        if key not in self._model_ids:
            self._model_ids[key] = multiplexed_model_id(model, self.platform)
        return self._model_ids[key]
