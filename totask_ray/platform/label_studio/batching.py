"""Many small requests gathered into few: Label Studio spends tens of ms of CPU per request, and
its bulk import recounts the whole project on each call, so a run reads and writes in chunks.

`_Gather` holds items for a moment and hands each chunk to a handler; each caller awaits its own
item's answer. `TaskReader` reads a chunk of tasks in one listing, `BulkWriter` writes a chunk of
predictions in one import and settles each task on its own (a refused task fails alone).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Protocol

from totask_ray.platform.errors import (
    NotFoundError,
    PlatformConnectionError,
    PlatformResponseError,
    ServerError,
    ValidationFailed,
)
from totask_ray.platform.http import Call, as_dict
from totask_ray.platform.label_studio.config import LabelStudioConfig
from totask_ray.platform.label_studio.created import prediction_of
from totask_ray.platform.label_studio.mapping import holds_prediction

# What a run reads of a task (`include`). With `include`, LS 1.23.2 gives annotations as {id}
# stubs, without `was_cancelled`: `total_annotations` counts those a person did not skip.
TASK_FIELDS = "id,data,predictions,annotations,total_annotations,project"


class Client(Protocol):
    """What the reader and the writer need of the async client."""

    config: LabelStudioConfig

    async def _execute(self, call: Call[Any]) -> Any: ...
    async def _read_task(self, project_id: int | None, task_id: int) -> dict[str, Any]: ...


Pending = list[tuple[Any, "asyncio.Future[Any]"]]


class _Gather:
    """Items gathered for a moment (`linger_s`, or until `chunk` are waiting) and handled as one
    request per chunk and key; each caller awaits its own item's answer."""

    def __init__(self, chunk: int, linger_s: float, max_wait_s: float | None = None):
        self.chunk = chunk
        self.linger_s = linger_s
        self.max_wait_s = max(linger_s, max_wait_s if max_wait_s is not None else linger_s)
        self._last_put: dict[int, float] = {}
        self._pending: dict[int, Pending] = {}
        self._timers: dict[int, asyncio.Task[None]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def put(self, key: int, item: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queue = self._pending.setdefault(key, [])
        queue.append((item, fut))
        self._last_put[key] = time.monotonic()
        if len(queue) >= self.chunk:
            self._flush(key)
        elif key not in self._timers:
            self._timers[key] = asyncio.create_task(self._linger(key))
        return await fut

    async def _linger(self, key: int) -> None:
        """Flush once no item came for `linger_s` (the tasks of a batch finish over a spread of
        downloads), or `max_wait_s` after the first: fewer, fuller requests."""
        first = time.monotonic()
        while True:
            await asyncio.sleep(self.linger_s)
            now = time.monotonic()
            if now - self._last_put.get(key, 0.0) >= self.linger_s or now - first >= self.max_wait_s:
                break
        self._timers.pop(key, None)
        self._flush(key)

    def _flush(self, key: int) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        batch = self._pending.pop(key, [])
        if batch:
            task = asyncio.create_task(self._guarded(key, batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _guarded(self, key: int, batch: Pending) -> None:
        try:
            await self.handle(key, batch)
        except Exception as exc:  # whatever the handler did not settle reports this
            _settle(batch, exc)

    async def handle(self, key: int, batch: Pending) -> None:  # pragma: no cover - per use
        raise NotImplementedError

    async def drain(self) -> None:
        for key in list(self._pending):
            self._flush(key)
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


class TaskReader(_Gather):
    """Tasks read in one listing per chunk (`selectedItems`, `fields=all`: data, predictions and
    annotations) instead of one request each: Label Studio spends tens of ms of CPU per request."""

    def __init__(self, client: Client, chunk: int = 100, linger_s: float = 0.01):
        super().__init__(chunk, linger_s, max_wait_s=0.1)
        self.client = client

    async def handle(self, project_id: int, batch: Pending) -> None:
        ids = [int(tid) for tid, _ in batch]
        query = json.dumps({"selectedItems": {"all": False, "included": ids}}, separators=(",", ":"))
        params = {
            "project": str(project_id),
            "fields": "all",
            "page_size": str(len(ids)),
            "query": query,
            "include": TASK_FIELDS,
        }
        body = await self.client._execute(Call("GET", "api/tasks/", as_dict, params=params))
        found = {t.get("id"): t for t in body.get("tasks") or [] if isinstance(t, dict)}
        for tid, fut in batch:
            if fut.done():
                continue
            if tid in found:
                fut.set_result(found[tid])
            else:
                fut.set_exception(
                    NotFoundError("GET", f"api/tasks/{tid}/", 404, "the task is not in the project")
                )


class BulkWriter(_Gather):
    """Predictions gathered for a moment and sent as one bulk import per chunk, one import at a
    time per client (Label Studio on SQLite answers concurrent writes with "database is locked").

    The import is all-or-nothing on a bad task id, so a refused chunk is split in halves and each
    half sent again, down to the one task the server refuses: only that task fails, with the
    server's reason. When the answer is lost (a 5xx, a timeout) or says fewer were created than sent
    (LS drops a result that does not fit its config without an error), the chunk's tasks are read
    back and only those without this run's prediction are sent again, once: nothing is written
    twice, and a task fails only when its prediction is not there."""

    def __init__(self, client: Client, chunk: int, linger_s: float):
        # LS's bulk import recounts every task of the project on each call (1.23.2,
        # `update_tasks_counters`): its cost is per call, not per prediction, so calls are few.
        super().__init__(chunk, linger_s, max_wait_s=max(1.0, 10 * linger_s))
        self.client = client
        self._one_at_a_time: asyncio.Lock | None = None

    async def _import(self, project_id: int, items: list[dict[str, Any]]) -> Any:
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        call = Call("POST", f"api/projects/{project_id}/import/predictions", as_dict, json=items)
        async with self._one_at_a_time:
            return await self.client._execute(call)

    async def handle(self, project_id: int, batch: Pending, *, retried: bool = False) -> None:
        items = [item for item, _ in batch]
        try:
            answer = await self._import(project_id, items)
        except ValidationFailed as exc:
            if len(batch) == 1:
                _settle(batch, _refusal(exc, items[0]["task"], project_id))
                return
            half = len(batch) // 2
            await self.handle(project_id, batch[:half], retried=retried)
            await self.handle(project_id, batch[half:], retried=retried)
            return
        except (ServerError, PlatformConnectionError) as exc:  # applied or not: look before resending
            await self._reconcile(project_id, batch, exc, retried)
            return
        created = answer.get("created")
        if isinstance(created, int) and created < len(items):
            dropped = PlatformResponseError(
                "Label Studio did not store the prediction (it drops a result that does not fit the "
                "project's labeling config without an error)"
            )
            await self._reconcile(project_id, batch, dropped, retried=True)
            return
        await self._settle_created(project_id, batch)

    async def _settle_created(self, project_id: int, batch: Pending) -> None:
        """Each task's answer: the prediction the import created (its id and result digest, for the
        run's ledger), read back in one listing per chunk: the import answers a count, not ids."""
        reads = await asyncio.gather(
            *(self.client._read_task(project_id, item["task"]) for item, _ in batch), return_exceptions=True
        )
        for (_, fut), raw in zip(batch, reads, strict=True):
            if fut.done():
                continue
            created = prediction_of(raw, self.client.config.model_version) if isinstance(raw, dict) else None
            fut.set_result(created)  # written either way; a failed read-back only loses the id

    async def _reconcile(self, project_id: int, batch: Pending, exc: Exception, retried: bool) -> None:
        """Settle what was written; send what was not once more (unless this was the second time)."""
        missing: Pending = []
        for item, fut in batch:
            try:
                raw = await self.client._read_task(project_id, item["task"])
            except Exception as read_error:  # the read-back failed: say so for this task
                _settle([(item, fut)], read_error)
                continue
            if holds_prediction(raw, self.client.config.model_version):
                if not fut.done():
                    fut.set_result(prediction_of(raw, self.client.config.model_version))
            else:
                missing.append((item, fut))
        if not missing:
            return
        if retried:
            _settle(missing, exc)
        else:
            await self.handle(project_id, missing, retried=True)


def _refusal(exc: ValidationFailed, task_id: int, project_id: int) -> ValidationFailed:
    """The server's refusal of one prediction, said shortly (it echoes the whole prediction)."""
    if "couldn't be retrieved" in exc.detail or "not found in project" in exc.detail:
        detail = f"task {task_id} is no longer in project {project_id} (deleted during the run?)"
    else:
        detail = exc.detail
    return ValidationFailed(exc.method, exc.path, exc.status_code, detail)


def _settle(batch: Pending, exc: BaseException | None) -> None:
    for _, fut in batch:
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
