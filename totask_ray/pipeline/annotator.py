"""The base of every annotator actor: a callable class for `Dataset.map_batches`.

A method (file, inference) subclasses `Annotator` and writes one thing, what a task's data is made
from; everything that must be the same for every method lives here: one async platform client and
one downloader per actor, a batch's tasks run concurrently on Ray Data's event loop under a
semaphore, per-task isolation, the validate-and-write, the workflow action, the outcome. A task is
either written correctly or reported failed with its reason: every exception inside a task becomes
that task's outcome, never an exception that kills the batch (one UDF exception would abort the
whole dataset). Only an outcome marked critical (the platform refused our token) asks the driver to
stop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from totask_ray.action import PluginContext
from totask_ray.annotation import AnnotationError, validate_task_data
from totask_ray.ledger.record import LedgerWriter
from totask_ray.net import redact
from totask_ray.net.downloads import Downloader, DownloadError
from totask_ray.net.images import ImageDecodeError, read_image_size
from totask_ray.params import EmptyResultPolicy, ExistingDataPolicy
from totask_ray.pipeline.outcomes import Outcome, Stage, Status, to_columns
from totask_ray.pipeline.spec import RunSpec
from totask_ray.pipeline.stop import StopWatch
from totask_ray.platform.base import AsyncPlatform, task_workflow
from totask_ray.platform.connect import connect, connect_async
from totask_ray.platform.errors import AuthenticationError, PlatformError
from totask_ray.platform.models import DataUnit, Task


class TaskFailed(Exception):
    """Ends one task's processing with a reason a user can act on."""

    def __init__(self, stage: Stage, message: str, *, critical: bool = False):
        super().__init__(message)
        self.stage = stage
        self.critical = critical


log = logging.getLogger("totask_ray")

# `Annotator.clock`'s stages: where in a task's clock each one's seconds add up
READ, MODEL, WRITE = 1, 2, 3


def safe_error(exc: BaseException) -> str:
    """`net.redact.safe_error` for a task's outcome: errors worded for users are shown bare."""
    return redact.safe_error(exc, bare=(PlatformError, DownloadError, AnnotationError, TaskFailed))


class Annotator:
    """What both annotators share: clients, the hook instance, per-task isolation, the write."""

    def __init__(self, spec: RunSpec, stop_flag: Any = None):
        """`stop_flag`: the run's stop flag (`pipeline.stop`), a Ray actor handle; None: no stop."""
        self.spec = spec
        self.options = spec.options
        self.params = spec.params
        self.action = spec.action_cls(spec.params)
        self.action.url_policy = spec.url_policy
        self.action.max_json_bytes = spec.options.max_json_bytes
        self.action.context = PluginContext(spec.params, client_factory=lambda: connect(spec.platform))
        self._threads = ThreadPoolExecutor(max_workers=spec.options.hook_threads, thread_name_prefix="hook")
        self._client: AsyncPlatform | None = None
        self._downloader: Downloader | None = None
        self._sem: asyncio.Semaphore | None = None
        self.node = _node_id()
        self._stop = StopWatch(stop_flag, on_run_over=self.release)
        # per task in flight: [start, read s, model s, write s] (`clock`), into its outcome at its end
        self._clocks: dict[int, list[float]] = {}
        # the run's ledger (what each write changed, for `totask-ray undo`); none in a dry run
        self._ledger = (
            LedgerWriter(spec.ledger) if spec.ledger is not None and not spec.options.dry_run else None
        )
        # Ray Data kills its actors without a close hook, so pooled sessions are never closed;
        # the OS reclaims the sockets, and asyncio's "Unclosed client session" noise is dropped.
        logging.getLogger("asyncio").addFilter(lambda r: not r.getMessage().startswith("Unclosed"))

    async def _ready(self) -> None:
        # aiohttp sessions belong to the loop that made them: create them on Ray Data's loop.
        if self._client is None:
            o = self.options
            self._client = connect_async(self.spec.platform)
            # the platform's own files may need its token (Label Studio's uploads); only its own
            self._downloader = Downloader(
                self.spec.url_policy, timeout_s=o.download_timeout_s, headers=self._client.media_headers
            )
            self._sem = asyncio.Semaphore(o.concurrency)
            self._stop.start()

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        await self._ready()
        ids = [int(t) for t in batch["task_id"]]
        outcomes = await self.run_batch(ids)
        return to_columns(outcomes)

    async def run_batch(self, ids: list[int]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._isolated(tid, self.process, tid) for tid in ids)))

    async def _isolated(
        self, task_id: int, fn: Callable[..., Awaitable[Any]], *args: Any, new_task: bool = True
    ) -> Any:
        """`fn(*args)` under the concurrency bound; any failure becomes this task's outcome, never
        an exception that would abort the batch (and with it the whole dataset).

        Once the run is stopped, a task that has not started yet is not started (`new_task`: this
        call is a task's first step); one already under way goes on to its end and reports."""
        assert self._sem is not None
        async with self._sem:
            if new_task and self._stop.stopped:
                return Outcome(task_id, Status.STOPPED, Stage.FETCH, "the run was stopped before this task")
            t0 = time.perf_counter()
            if new_task:
                self._clocks[task_id] = [t0, 0.0, 0.0, 0.0]
            try:
                result = await fn(*args)
            except TaskFailed as exc:
                result = Outcome(task_id, Status.FAILED, exc.stage, safe_error(exc), critical=exc.critical)
            except Exception as exc:  # a bug or a hook's surprise: this task's failure, not the batch's
                result = Outcome(task_id, Status.FAILED, Stage.CONVERT, safe_error(exc))
            if isinstance(result, Outcome):
                t1 = time.perf_counter()
                result.duration_ms = (t1 - t0) * 1000
                result.node = self.node
                result.finished_at = time.time()
                clock = self._clocks.pop(task_id, None)
                if clock is not None:
                    start, read, model, write = clock
                    result.read_ms, result.model_ms, result.write_ms = read * 1000, model * 1000, write * 1000
                    result.convert_ms = max(0.0, t1 - start - read - model - write) * 1000
            return result

    def clock(self, task_id: int, stage: int, seconds: float) -> None:
        """Add `seconds` to one of a task's stage times (`READ`, `MODEL`, `WRITE`); the rest of its
        time is its convert. A few float additions a task: what lets the run name its bound."""
        c = self._clocks.get(task_id)
        if c is not None:
            c[stage] += seconds

    async def process(self, task_id: int) -> Outcome:  # pragma: no cover - per annotator
        raise NotImplementedError

    def release(self) -> None:
        """The run is over (its stop flag is gone): let go of whatever would keep this actor from
        exiting as soon as Ray Data drops it. Nothing here by default."""

    # -- steps shared by both methods --------------------------------------------------------------

    async def fetch_task(self, task_id: int) -> tuple[Task, DataUnit]:
        assert self._client is not None
        t0 = time.perf_counter()
        try:
            task = await self._client.get_task(task_id)
            unit = task.expanded_data_unit
            if unit is None or not unit.files:
                if task.data_unit_id is None:
                    raise TaskFailed(Stage.FETCH, "task has no data unit")
                unit = await self._client.get_data_unit(task.data_unit_id)
        except AuthenticationError as exc:
            raise TaskFailed(Stage.FETCH, safe_error(exc), critical=True) from exc
        except PlatformError as exc:
            raise TaskFailed(Stage.FETCH, f"could not read the task: {safe_error(exc)}") from exc
        finally:
            self.clock(task_id, READ, time.perf_counter() - t0)
        return task, unit

    def skip_existing(self, task: Task) -> Outcome | None:
        if task.already_done is not None:
            return Outcome(task.id, Status.SKIPPED, Stage.DONE, task.already_done)
        if self.params.existing_data is ExistingDataPolicy.SKIP and task.data:
            return Outcome(task.id, Status.SKIPPED, Stage.DONE, "task already holds annotation data")
        return None

    async def call_hook(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A user hook: awaited when async, otherwise in a worker thread so the loop keeps going."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._threads, lambda: fn(*args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    async def image_size(self, url: str | None, image: np.ndarray | None = None) -> tuple[int, int] | None:
        """The primary image's (width, height) where the platform stores coordinates relative to it
        (Label Studio's percentages); None where it stores pixels (Synapse), at no cost."""
        if not self._client.needs_image_size:
            return None
        if image is not None:
            return int(image.shape[1]), int(image.shape[0])
        if not url:
            raise TaskFailed(Stage.LOCATE, "the task has no primary image to take the coordinates' size from")
        assert self._downloader is not None
        try:
            body = await self._downloader.fetch_image(url, max_bytes=self.options.max_image_bytes)
        except DownloadError as exc:
            raise TaskFailed(Stage.CONVERT, f"could not read the image's size: {safe_error(exc)}") from exc
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._threads, read_image_size, body)
        except ImageDecodeError as exc:
            raise TaskFailed(Stage.CONVERT, exc.about("the primary file")) from None

    async def validate_and_write(
        self, task: Task, data: Any, *, image_url: str | None = None, image: np.ndarray | None = None
    ) -> Outcome:
        assert self._client is not None
        schema = self.params.schema
        if data is None or data == {} or data == []:
            raise TaskFailed(Stage.CONVERT, self.empty_message)
        try:
            validate_task_data(data, schema)
        except AnnotationError as exc:
            raise TaskFailed(Stage.VALIDATE, f"invalid annotation: {exc}") from exc
        listed = data.get("objects") if isinstance(data, dict) else None
        n_objects = len(listed) if isinstance(listed, list) else 0
        empty = isinstance(listed, list) and not listed
        if empty and self.empty_policy is EmptyResultPolicy.FAIL:
            raise TaskFailed(Stage.CONVERT, "the result holds no object (empty_result: fail)")
        if empty and self.empty_policy is EmptyResultPolicy.SKIP:
            return Outcome(
                task.id, Status.SKIPPED, Stage.DONE, "the result holds no object (empty_result: skip)"
            )
        done = Status.EMPTY if empty else Status.SUCCESS
        if task.data == data:
            # Already there (an earlier run wrote it and was stopped before reporting it): writing
            # again would be a second write of the same data, and a second workflow action.
            outcome = Outcome(task.id, Status.UNCHANGED, Stage.DONE, objects=n_objects)
            if not self.options.dry_run:
                if self._ledger is not None and self.params.on_success is not None:
                    self._ledger.before(
                        task.id, None, None, writes_data=False, workflow=_workflow_fields(task)
                    )
                    await self._recorded(task.id)
                wf = await self.apply_workflow(outcome, task)
                if self._ledger is not None and wf is not None:
                    self._ledger.written(task.id, workflow=wf)
                    await self._confirmed(task.id)
            return outcome
        if self.options.dry_run:
            return Outcome(task.id, done, Stage.DONE, objects=n_objects, would_write=json.dumps(data))
        size = await self.image_size(image_url, image)
        if self._ledger is not None:  # before the write is sent: a kill after it still leaves this
            wf0 = _workflow_fields(task) if self.params.on_success is not None else None
            self._ledger.before(task.id, task.data, data, workflow=wf0)
            await self._recorded(task.id)
        t0 = time.perf_counter()
        try:
            answer = await self._client.annotate_task(task, data, schema, image_size=size)
        except AuthenticationError as exc:
            raise TaskFailed(Stage.WRITE, safe_error(exc), critical=True) from exc
        except PlatformError as exc:
            raise TaskFailed(Stage.WRITE, f"could not write the annotation: {safe_error(exc)}") from exc
        finally:
            self.clock(task.id, WRITE, time.perf_counter() - t0)
        outcome = Outcome(task.id, done, Stage.DONE, written=True, objects=n_objects)
        t1 = time.perf_counter()
        wf = await self.apply_workflow(outcome, task)
        self.clock(task.id, WRITE, time.perf_counter() - t1)
        if self._ledger is not None:
            created = answer.get("created") if isinstance(answer, dict) else None
            self._ledger.written(task.id, created=created, workflow=wf)
            await self._confirmed(task.id)
        return outcome

    async def _recorded(self, task_id: int) -> None:
        """The `b` line is in the run's ledger, or the write is not sent (undo could not take back
        a write the ledger does not list)."""
        assert self._ledger is not None
        try:
            await self._ledger.flush()
        except Exception as exc:
            raise TaskFailed(
                Stage.WRITE, f"not written: the run's ledger could not record the task ({safe_error(exc)})"
            ) from exc

    async def _confirmed(self, task_id: int) -> None:
        """The `w` line: the write happened either way; without it undo checks the task's digest."""
        assert self._ledger is not None
        try:
            await self._ledger.flush()
        except Exception as exc:
            log.warning("[Task %d] written; the ledger could not confirm it: %s", task_id, safe_error(exc))

    empty_message = "the hook returned no data"
    # What an object list with nothing in it does (`empty_result`); only a model's result is judged.
    empty_policy: EmptyResultPolicy = EmptyResultPolicy.WRITE

    async def apply_workflow(self, outcome: Outcome, task: Task) -> dict[str, Any] | None:
        """The optional `on_success` action, applied only where the task is not in its target state
        yet (`task` is as read before the write), so a re-run applies nothing twice. Its failure
        is recorded but never undoes the write.

        Returns the workflow fields as the action left them (for the run's ledger), or None when
        it changed nothing."""
        action = self.params.on_success
        if action is None:
            return None
        assert self._client is not None
        changes: dict[str, Any] = {}
        if action.status is not None and task.status != action.status:
            changes["status"] = action.status
        if action.assignee is not None and task.assignee != action.assignee:
            changes["assignee"] = action.assignee
        # `submit` advances a stage each time: after a write of ours, or where the task still sits
        # where the job's status filter found it (an earlier run wrote it but never got to submit).
        submit = action.submit and (outcome.written or self._still_selected(task))
        left = _workflow_fields(task)
        try:
            workflow = task_workflow(self._client)
            if changes:
                left.update(_workflow_fields(await workflow.update_task(outcome.task_id, changes)))
            if submit:
                left.update(_workflow_fields(await workflow.submit_task(outcome.task_id)))
        except PlatformError as exc:
            outcome.workflow_error = safe_error(exc)
        else:
            outcome.workflow_applied = bool(changes) or submit
        return left if outcome.workflow_applied or outcome.workflow_error else None

    def _still_selected(self, task: Task) -> bool:
        filters = self.params.task_filters
        if "status" in filters:
            return task.status == filters["status"]
        if "status__in" in filters:
            wanted = filters["status__in"]
            values = wanted.split(",") if isinstance(wanted, str) else list(wanted)
            return task.status in values
        return False  # no status to tell: never advance a task this run did not write


def _workflow_fields(task: Task | dict[str, Any]) -> dict[str, Any]:
    """The fields `on_success` may change, as a task read or a workflow call's answer holds them."""
    if isinstance(task, Task):
        return {"status": task.status, "assignee": task.assignee}
    return {k: task[k] for k in ("status", "assignee") if isinstance(task, dict) and k in task}


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""
