"""The Label Studio REST clients, behind the same protocols as the Synapse ones.

This module holds the endpoints and the two flavours; what maps where is `mapping.py`, the token
is `auth.py`, chunked reads and writes are `batching.py`. Predictions go in chunks through the bulk
import, and a chunk the server refuses is bisected so only the bad task fails, with the server's
reason; a task that already holds this run's result is skipped, so a re-run writes nothing twice.

Label Studio has no plugin releases, agents, workflow stages or job records: releases come from the
config (`releases`, the CLI's `--release`); the clients implement neither `JobRecords`, `Agents`
nor `TaskWorkflow`, and `platform.base` refuses those with a clear message.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from totask_ray.platform.base import TaskIdPage
from totask_ray.platform.errors import PlatformError
from totask_ray.platform.http import AsyncHttp, BlockingHttp, Call, as_dict
from totask_ray.platform.label_studio import mapping
from totask_ray.platform.label_studio.auth import Refresh, TokenAuth, adrive, drive
from totask_ray.platform.label_studio.batching import BulkWriter, TaskReader
from totask_ray.platform.label_studio.config import LabelStudioConfig, WriteAs
from totask_ray.platform.label_studio.created import annotation_created
from totask_ray.platform.label_studio.filters import TaskQuery, to_query
from totask_ray.platform.label_studio.mapping import ProjectInfo
from totask_ray.platform.models import DataCollection, DataUnit, PluginRelease, Project, Task


class _Endpoints:
    """Each endpoint written once; `_execute` makes it blocking or awaitable."""

    name = "Label Studio"
    _core: Any
    _queries: dict[str, TaskQuery]
    _execute: Any  # the flavour (BlockingHttp, AsyncHttp) provides it

    @property
    def config(self) -> LabelStudioConfig:
        return self._core.config

    def _query(self, filters: Mapping[str, Any]) -> TaskQuery:
        key = json.dumps(dict(filters), sort_keys=True, default=str)
        if key not in self._queries:
            self._queries[key] = to_query(filters)
        return self._queries[key]

    def _project_call(self, project_id: int) -> Call[ProjectInfo]:
        return Call("GET", f"api/projects/{int(project_id)}/", mapping.parse_project)

    def _tasks_call(
        self, project_id: int, filters: Mapping[str, Any], page: int, size: int
    ) -> Call[TaskIdPage]:
        q = self._query(filters)
        params = {
            "project": str(int(project_id)),
            "page": str(page),
            "page_size": str(size),
            "query": q.query,
            "include": "id",  # without it LS computes a dozen columns per task: 5-10x the time
        }
        return Call("GET", "api/tasks/", mapping.id_page(q.limit, page, size), params=params)

    def _range_call(self, project_id: int, q: TaskQuery, size: int) -> Call[TaskIdPage]:
        """The first page of an id-range query (its `limit` is None: ranges are not read with one)."""
        params = {
            "project": str(int(project_id)),
            "page": "1",
            "page_size": str(size),
            "query": q.query,
            "include": "id",
        }
        return Call("GET", "api/tasks/", mapping.id_page(None, 1, size), params=params)

    def _task_call(self, task_id: int) -> Call[dict[str, Any]]:
        return Call("GET", f"api/tasks/{int(task_id)}/", as_dict)

    def _annotation_call(self, task_id: int, result: list[dict[str, Any]]) -> Call[dict[str, Any]]:
        return Call(
            "POST", f"api/tasks/{int(task_id)}/annotations/", as_dict, json=mapping.annotation(result)
        )

    def get_plugin_release(self, release_id: int) -> PluginRelease:
        config = self.config.releases.get(int(release_id))
        if config is None:
            raise PlatformError(
                f"Pre-processor not found: Label Studio has no plugin releases; give release {release_id}'s "
                f"config.yaml with --release {release_id}=path/to/config.yaml (Python: LabelStudioConfig(releases=...))"
            )
        return PluginRelease(id=int(release_id), version=str(config.get("version", "0")), config=config)


class LabelStudioClient(_Endpoints, BlockingHttp):
    """Blocking client: the driver's steps, the id source's reads, a notebook."""

    supports_workflow = False  # no task status, assignee or submit

    def __init__(self, config: LabelStudioConfig, *, transport: httpx.BaseTransport | None = None):
        self._init_http(config, transport)
        self._projects: dict[int, ProjectInfo] = {}
        self._queries = {}
        self._auth = TokenAuth(config, self._core)
        self._lock = threading.Lock()

    def _auth_step(self, step: Call[Any] | Refresh) -> Any:
        if not isinstance(step, Refresh):
            return BlockingHttp._execute(self, step)
        with self._lock:
            trade = self._auth.trade(step)
            if trade is not None:
                self._auth.use(BlockingHttp._execute(self, trade))
        return None

    def _execute(self, call: Call[Any]) -> Any:
        return drive(self._auth.flow(call), self._auth_step)

    def project_info(self, project_id: int) -> ProjectInfo:
        if project_id not in self._projects:
            self._projects[project_id] = self._execute(self._project_call(project_id))
        return self._projects[project_id]

    def get_project(self, project_id: int) -> Project:
        return self.project_info(project_id).project

    def get_data_collection(self, collection_id: int) -> DataCollection:
        info = self.project_info(collection_id)
        page = self._execute(
            Call("GET", "api/tasks/", as_dict, params={"project": str(collection_id), "page_size": "1"})
        )
        tasks = page.get("tasks") or []
        return mapping.collection(info, tasks[0] if tasks and isinstance(tasks[0], dict) else None)

    def count_tasks(self, project_id: int, filters: Mapping[str, Any]) -> int:
        return self._execute(self._tasks_call(project_id, filters, 1, 1)).count

    def task_id_page(
        self, project_id: int, filters: Mapping[str, Any], *, page: int = 1, page_size: int | None = None
    ) -> TaskIdPage:
        return self._execute(self._tasks_call(project_id, filters, page, page_size or self.config.page_size))

    def id_bounds(self, project_id: int, filters: Mapping[str, Any]) -> tuple[int, int] | None:
        """The lowest and highest matching ids (`IdRanges`): the Data Manager orders by id both
        ways and filters id ranges; a job with `limit` is read by pages (None)."""
        if self._query(filters).limit is not None:
            return None
        first = self._execute(self._range_call(project_id, to_query(filters), 1))
        last = self._execute(self._range_call(project_id, to_query(filters, descending=True), 1))
        if not first.ids or not last.ids:
            return None
        return first.ids[0], last.ids[0]

    def task_id_range_page(
        self,
        project_id: int,
        filters: Mapping[str, Any],
        *,
        after: int,
        upto: int,
        page_size: int | None = None,
    ) -> TaskIdPage:
        q = to_query(filters, after=after, upto=upto)
        return self._execute(self._range_call(project_id, q, page_size or self.config.page_size))

    def iter_task_ids(
        self, project_id: int, filters: Mapping[str, Any], page_size: int | None = None
    ) -> Iterator[int]:
        page = 1
        while True:
            got = self.task_id_page(project_id, filters, page=page, page_size=page_size)
            yield from got.ids
            if not got.next:
                return
            page += 1

    def get_task(self, task_id: int) -> Task:
        raw = self._execute(self._task_call(task_id))
        pid = raw.get("project")
        return mapping.to_task(raw, self.project_info(pid) if isinstance(pid, int) else None, self.config)

    def task_raw(self, task_id: int) -> dict[str, Any]:
        """A task as Label Studio holds it: its predictions and annotations (what an undo checks)."""
        return self._execute(self._task_call(task_id))

    def tasks_raw(self, project_id: int, task_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Several tasks as Label Studio holds them, in one listing (`selectedItems`): by id; an id
        the project no longer holds is left out. Without `include`: with it, a listing's
        annotations are their ids alone (1.23.2), and a diff reads their results and parents."""
        query = json.dumps({"selectedItems": {"all": False, "included": [int(t) for t in task_ids]}})
        params = {
            "project": str(int(project_id)),
            "fields": "all",
            "page_size": str(max(1, len(task_ids))),
            "query": query,
        }
        body = self._execute(Call("GET", "api/tasks/", as_dict, params=params))
        return {
            t["id"]: t
            for t in body.get("tasks") or []
            if isinstance(t, dict) and isinstance(t.get("id"), int)
        }

    def delete_prediction(self, prediction_id: int) -> None:
        """Delete one prediction (an undo's write; a replay finds it gone: 404, which the undo reads)."""
        self._execute(Call("DELETE", f"api/predictions/{int(prediction_id)}/", lambda b: b))

    def delete_annotation(self, annotation_id: int) -> None:
        self._execute(Call("DELETE", f"api/annotations/{int(annotation_id)}/", lambda b: b))

    def annotate_task(
        self,
        task: Task,
        data: dict[str, Any],
        schema: str | None = None,
        *,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        pid = (
            task.project
            if task.project is not None
            else self._execute(self._task_call(task.id)).get("project")
        )
        result, score = mapping.convert(task.id, data, self.project_info(int(pid)), image_size)  # type: ignore[arg-type]
        if self.config.write is WriteAs.ANNOTATIONS:
            return self._execute(self._annotation_call(task.id, result))
        body = mapping.prediction(task.id, result, score, self.config)
        return self._execute(Call("POST", "api/predictions/", as_dict, json=body))


class AsyncLabelStudioClient(_Endpoints, AsyncHttp):
    """Async client for one annotator actor; predictions are written in chunks (`BulkWriter`)."""

    needs_image_size = True  # coordinates are percentages of the image

    def __init__(self, config: LabelStudioConfig, *, transport: httpx.AsyncBaseTransport | None = None):
        self._init_http(config, transport)
        self._projects: dict[int, ProjectInfo] = {}
        self._queries = {}
        self._auth = TokenAuth(config, self._core)
        self._auth_lock: asyncio.Lock | None = None
        self._writer = BulkWriter(self, config.write_chunk, config.write_linger_s)
        self._reader = TaskReader(self)
        self._project_reads: dict[int, asyncio.Future[ProjectInfo]] = {}
        self._origin = urlsplit(config.host)

    async def _auth_step(self, step: Call[Any] | Refresh) -> Any:
        if not isinstance(step, Refresh):
            return await AsyncHttp._execute(self, step)
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            trade = self._auth.trade(step)
            if trade is not None:
                self._auth.use(await AsyncHttp._execute(self, trade))
        return None

    async def _execute(self, call: Call[Any]) -> Any:
        return await adrive(self._auth.flow(call), self._auth_step)

    async def media_headers(self, url: str) -> dict[str, str]:
        """The token, for a file on this Label Studio server only (an upload, a local file)."""
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != (self._origin.scheme, self._origin.netloc):
            return {}
        await adrive(self._auth.flow(None), self._auth_step)
        auth = self._core.headers.get("Authorization")
        return {"Authorization": auth} if auth else {}

    async def project_info(self, project_id: int) -> ProjectInfo:
        """The project and its labeling config, read once per actor (one request in flight)."""
        if project_id not in self._projects:
            pending = self._project_reads.get(project_id)
            if pending is None:
                pending = self._project_reads[project_id] = asyncio.ensure_future(
                    self._execute(self._project_call(project_id))
                )
            try:
                self._projects[project_id] = await asyncio.shield(pending)
            finally:
                if pending.done():
                    self._project_reads.pop(project_id, None)
        return self._projects[project_id]

    async def _read_task(self, project_id: int | None, task_id: int) -> dict[str, Any]:
        """One task as Label Studio holds it: through the chunked reader when the run's project is
        known (it always is in a run), else on its own."""
        if project_id is None:
            return await self._execute(self._task_call(task_id))
        return await self._reader.put(project_id, int(task_id))

    async def get_task(self, task_id: int) -> Task:
        raw = await self._read_task(self.config.project, task_id)
        pid = raw.get("project")
        info = await self.project_info(pid) if isinstance(pid, int) else None
        return mapping.to_task(raw, info, self.config)

    async def get_data_unit(self, data_unit_id: int) -> DataUnit:
        task = await self.get_task(data_unit_id)  # a task's files are its own data keys
        assert isinstance(task.data_unit, DataUnit)
        return task.data_unit

    async def annotate_task(
        self,
        task: Task,
        data: dict[str, Any],
        schema: str | None = None,
        *,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        pid = task.project
        if pid is None:  # a task not read by this client: ask which project holds it
            pid = (await self._execute(self._task_call(task.id))).get("project")
        info = await self.project_info(int(pid))  # type: ignore[arg-type]
        result, score = mapping.convert(task.id, data, info, image_size)
        # `created`: what the write made (id, result digest), for the run's ledger (`totask-ray undo`)
        if self.config.write is WriteAs.ANNOTATIONS:
            answer = await self._execute(self._annotation_call(task.id, result))
            return {**answer, "created": annotation_created(answer)}
        created = await self._writer.put(int(pid), mapping.prediction(task.id, result, score, self.config))  # type: ignore[arg-type]
        return {"task": task.id, "created": created}

    async def iter_task_ids(
        self, project_id: int, filters: Mapping[str, Any], page_size: int | None = None
    ) -> AsyncIterator[int]:
        page = 1
        while True:
            got = await self._execute(
                self._tasks_call(project_id, filters, page, page_size or self.config.page_size)
            )
            for tid in got.ids:
                yield tid
            if not got.next:
                return
            page += 1

    async def aclose(self) -> None:
        await self._writer.drain()
        await self._reader.drain()
        await AsyncHttp.aclose(self)
