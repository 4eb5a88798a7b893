"""The Label Studio REST client, behind the same protocols as the Synapse one.

What maps where:
- a project is a project; its classes are the labels its labeling config offers;
- a task's files are its data keys (`data.image` is the primary file, the key the config's
  `<Image value="$image">` names); relative URLs (`/data/upload/...`, `/data/local-files/...`)
  are made absolute on the server and fetched with the token, and only there;
- a write is a prediction with `model_version` (the job's name unless given) and region scores, or
  an annotation on request; predictions go in chunks through the bulk import, and a chunk the
  server refuses is bisected so only the bad task fails, with the server's reason;
- a task that already holds a prediction of this `model_version` (annotations: any annotation)
  is done: the run skips it, so a re-run writes nothing twice.

Auth: a personal access token (a JWT refresh token) is traded at `/api/token/refresh/` for an access
token that lasts minutes; it is renewed before it expires and once more on a 401. A legacy key is
sent as `Authorization: Token ...`. Neither ever appears in a message.

Label Studio has no plugin releases, agents, workflow stages or job records: releases come from the
config (`releases`, the CLI's `--release`), and the rest are refused with a clear message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from totask_ray.platform.base import TaskIdPage
from totask_ray.platform.errors import (
    AuthenticationError,
    NotFoundError,
    PlatformConnectionError,
    PlatformError,
    PlatformResponseError,
    ServerError,
    ValidationFailed,
)
from totask_ray.platform.http import AsyncHttp, BlockingHttp, Call, as_dict
from totask_ray.platform.label_studio.config import LabelStudioConfig, WriteAs
from totask_ray.platform.label_studio.convert import ConversionError, to_results
from totask_ray.platform.label_studio.filters import TaskQuery, to_query
from totask_ray.platform.label_studio.labeling import (
    LabelingConfig,
    LabelingConfigError,
    parse_labeling_config,
)
from totask_ray.platform.models import (
    Agent,
    DataCollection,
    DataUnit,
    FileSpecification,
    Job,
    PluginRelease,
    Project,
    ProjectClass,
    Task,
)

REFRESH_PATH = "api/token/refresh/"
REFRESH_MARGIN_S = 30.0
# what a run reads of a task (`include`: Label Studio's field selection; the rest costs it CPU)
TASK_FIELDS = "id,data,predictions,annotations,project"
NO_JOBS = "Label Studio keeps no job records: leave out job_id / create_job (--job-id) on this platform"
NO_AGENTS = "Label Studio has no agents: leave out `agent`; the pre-processor runs on this run's Ray cluster"


@dataclass(frozen=True)
class ProjectInfo:
    project: Project
    labeling: LabelingConfig

    @property
    def classes(self) -> dict[int, str]:
        return {c.id: c.name for c in self.project.classes}


def parse_project(body: Any) -> ProjectInfo:
    body = as_dict(body)
    try:
        labeling = parse_labeling_config(body.get("label_config") or "")
    except LabelingConfigError as exc:
        raise PlatformError(f"Label Studio project {body.get('id')}: {exc}") from None
    classes = [ProjectClass(id=i, name=name) for i, name in enumerate(labeling.labels)]
    project = Project(id=body["id"], title=body.get("title"), data_collection=body["id"], classes=classes)
    return ProjectInfo(project, labeling)


def _jwt_expiry(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _access(body: Any) -> str:
    token = as_dict(body).get("access")
    if not isinstance(token, str) or not token:
        raise ValueError("no access token in the answer")
    return token


def _page(limit: int | None, page: int, size: int):
    def parse(body: Any) -> TaskIdPage:
        body = as_dict(body)
        tasks, total = body.get("tasks"), body.get("total")
        if not isinstance(tasks, list) or not isinstance(total, int):
            raise ValueError("a task listing must carry 'tasks' and 'total'")
        ids = []
        for t in tasks:
            tid = t.get("id") if isinstance(t, dict) else None
            if not isinstance(tid, int) or isinstance(tid, bool):
                raise ValueError("every listed task must carry an integer 'id'")
            ids.append(tid)
        count = total if limit is None else min(total, limit)
        first = (page - 1) * size
        ids = ids[: max(0, count - first)]
        more = first + size < count
        return TaskIdPage(count=count, ids=ids, next=str(page + 1) if more else None)

    return parse


class _Endpoints:
    """Each endpoint written once; `_execute` makes it blocking or awaitable."""

    _core: Any
    _projects: dict[int, ProjectInfo]
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
        return Call("GET", f"api/projects/{int(project_id)}/", parse_project)

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
        return Call("GET", "api/tasks/", _page(q.limit, page, size), params=params)

    def _task_call(self, task_id: int) -> Call[dict[str, Any]]:
        return Call("GET", f"api/tasks/{int(task_id)}/", as_dict)

    def _to_task(self, raw: dict[str, Any], info: ProjectInfo | None) -> Task:
        """A Label Studio task as the run sees it: its data keys as files, what it already holds."""
        tid = raw.get("id")
        if not isinstance(tid, int):
            raise PlatformResponseError("a Label Studio task came back without an integer id")
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        primary = info.labeling.image_key if info is not None else None
        files = {}
        for key, value in data.items():
            if isinstance(value, str) and value:
                url = urljoin(f"{self.config.host}/", value) if value.startswith("/") else value
                files[key] = {"url": url, "is_primary": key == primary, "specification": key}
        return Task(
            id=tid,
            data=None,
            data_unit=DataUnit(id=tid, files=files),
            already_done=self._done_reason(raw),
            project=raw.get("project"),
        )

    def _done_reason(self, raw: dict[str, Any]) -> str | None:
        if self.config.write is WriteAs.ANNOTATIONS:
            held = [
                a for a in raw.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")
            ]
            return "the task already holds an annotation" if held else None
        mv = self.config.model_version
        for p in raw.get("predictions") or []:
            if isinstance(p, dict) and p.get("model_version") == mv:
                return f"the task already holds a prediction of model_version {mv!r}"
        return None

    def _convert(
        self, task_id: int, data: dict[str, Any], info: ProjectInfo, image_size: tuple[int, int] | None
    ) -> tuple[list[dict[str, Any]], float | None]:
        try:
            return to_results(data, info.labeling, info.classes, image_size)
        except ConversionError as exc:
            raise ValidationFailed(
                "POST", f"task {task_id}", 400, f"cannot convert to Label Studio: {exc}"
            ) from None

    def _prediction(self, task_id: int, result: list[dict[str, Any]], score: float | None) -> dict[str, Any]:
        item: dict[str, Any] = {
            "task": int(task_id),
            "result": result,
            "model_version": self.config.model_version,
        }
        if score is not None:
            item["score"] = score
        return item

    def _annotation_call(self, task_id: int, result: list[dict[str, Any]]) -> Call[dict[str, Any]]:
        body = {"result": result, "was_cancelled": False, "ground_truth": False}
        return Call("POST", f"api/tasks/{int(task_id)}/annotations/", as_dict, json=body)

    def _collection(self, info: ProjectInfo, sample: dict[str, Any] | None) -> DataCollection:
        keys = dict.fromkeys(info.labeling.images.values())
        if sample is not None and isinstance(sample.get("data"), dict):
            keys.update(dict.fromkeys(k for k, v in sample["data"].items() if isinstance(v, str)))
        primary = info.labeling.image_key
        specs = [FileSpecification(name=k, is_primary=k == primary) for k in keys]
        return DataCollection(id=info.project.id, name=info.project.title, file_specifications=specs)

    # -- the personal access token, traded for an access token (both flavours) ------------------

    _expires: float

    def _fresh(self) -> bool:
        return time.time() < self._expires - REFRESH_MARGIN_S

    def _refresh_call(self) -> Call[str]:
        """The trade, sent without the (maybe expired) access token: LS refuses a bad Bearer first."""
        self._core.set_headers(self.config.headers())
        return Call("POST", REFRESH_PATH, _access, json={"refresh": self.config.api_key.get_secret_value()})

    def _use_access(self, access: str) -> None:
        self._core.extra_secrets = [access]
        self._core.set_headers({**self.config.headers(), "Authorization": f"Bearer {access}"})
        self._expires = _jwt_expiry(access) or time.time() + 240

    # -- what Label Studio does not have ------------------------------------------------------

    def get_plugin_release(self, release_id: int) -> PluginRelease:
        config = self.config.releases.get(int(release_id))
        if config is None:
            raise PlatformError(
                f"Pre-processor not found: Label Studio has no plugin releases; give release {release_id}'s "
                f"config.yaml with --release {release_id}=path/to/config.yaml (Python: LabelStudioConfig(releases=...))"
            )
        return PluginRelease(id=int(release_id), version=str(config.get("version", "0")), config=config)

    def list_serve_applications(self, plugin_code: str, agent: int | None = None) -> list[dict[str, Any]]:
        raise PlatformError(NO_AGENTS)

    def run_plugin(self, code: str, body: dict[str, Any]) -> Any:
        raise PlatformError(NO_AGENTS)

    def get_agent(self, agent_id: int) -> Agent | None:
        raise PlatformError(NO_AGENTS)

    def create_job(self, body: dict[str, Any]) -> Job:
        raise PlatformError(NO_JOBS)

    def get_job(self, job_id: int) -> Job:
        raise PlatformError(NO_JOBS)

    def update_job(self, job_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        raise PlatformError(NO_JOBS)

    def post_logs(self, events: list[dict[str, Any]]) -> Any:
        raise PlatformError(NO_JOBS)


class LabelStudioClient(_Endpoints, BlockingHttp):
    """Blocking client: the driver's steps, the id source's reads, a notebook."""

    supports_workflow = False  # no task status, assignee or submit

    def __init__(self, config: LabelStudioConfig, *, transport: httpx.BaseTransport | None = None):
        self._init_http(config, transport)
        self._projects = {}
        self._queries = {}
        self._expires = 0.0
        self._lock = threading.Lock()

    def _authorize(self, force: bool = False) -> None:
        if not self.config.personal_token:
            return
        with self._lock:
            if not force and self._fresh():
                return
            self._use_access(BlockingHttp._execute(self, self._refresh_call()))

    def _execute(self, call: Call[Any]) -> Any:
        self._authorize()
        try:
            return BlockingHttp._execute(self, call)
        except AuthenticationError:
            if not self.config.personal_token:
                raise
            self._authorize(force=True)  # revoked or expired early: one fresh access token, once
            return BlockingHttp._execute(self, call)

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
        return self._collection(info, tasks[0] if tasks and isinstance(tasks[0], dict) else None)

    def count_tasks(self, project_id: int, filters: Mapping[str, Any]) -> int:
        return self._execute(self._tasks_call(project_id, filters, 1, 1)).count

    def task_id_page(
        self, project_id: int, filters: Mapping[str, Any], *, page: int = 1, page_size: int | None = None
    ) -> TaskIdPage:
        return self._execute(self._tasks_call(project_id, filters, page, page_size or self.config.page_size))

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
        return self._to_task(raw, self.project_info(pid) if isinstance(pid, int) else None)

    def annotate_task(
        self,
        task_id: int,
        data: dict[str, Any],
        schema: str | None = None,
        *,
        image_size: tuple[int, int] | None = None,
        project_id: int | None = None,
    ) -> dict[str, Any]:
        if project_id is None:
            project_id = self._execute(self._task_call(task_id)).get("project")
        result, score = self._convert(task_id, data, self.project_info(int(project_id)), image_size)  # type: ignore[arg-type]
        if self.config.write is WriteAs.ANNOTATIONS:
            return self._execute(self._annotation_call(task_id, result))
        return self._execute(
            Call("POST", "api/predictions/", as_dict, json=self._prediction(task_id, result, score))
        )


class AsyncLabelStudioClient(_Endpoints, AsyncHttp):
    """Async client for one annotator actor; predictions are written in chunks (`_BulkWriter`)."""

    needs_image_size = True  # coordinates are percentages of the image

    def __init__(self, config: LabelStudioConfig, *, transport: httpx.AsyncBaseTransport | None = None):
        self._init_http(config, transport)
        self._projects = {}
        self._queries = {}
        self._expires = 0.0
        self._auth_lock: asyncio.Lock | None = None
        self._project_of: dict[int, int] = {}
        self._writer = _BulkWriter(self, config.write_chunk, config.write_linger_s)
        self._reader = _TaskReader(self)
        self._project_reads: dict[int, asyncio.Future[ProjectInfo]] = {}
        self._origin = urlsplit(config.host)

    async def _authorize(self, force: bool = False) -> None:
        if not self.config.personal_token:
            return
        if self._auth_lock is None:
            self._auth_lock = asyncio.Lock()
        async with self._auth_lock:
            if not force and self._fresh():
                return
            self._use_access(await AsyncHttp._execute(self, self._refresh_call()))

    async def _execute(self, call: Call[Any]) -> Any:
        await self._authorize()
        try:
            return await AsyncHttp._execute(self, call)
        except AuthenticationError:
            if not self.config.personal_token:
                raise
            await self._authorize(force=True)
            return await AsyncHttp._execute(self, call)

    async def media_headers(self, url: str) -> dict[str, str]:
        """The token, for a file on this Label Studio server only (an upload, a local file)."""
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) != (self._origin.scheme, self._origin.netloc):
            return {}
        await self._authorize()
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
        if isinstance(pid, int):
            self._project_of[int(task_id)] = pid
        return self._to_task(raw, info)

    async def get_data_unit(self, data_unit_id: int) -> DataUnit:
        task = await self.get_task(data_unit_id)  # a task's files are its own data keys
        assert isinstance(task.data_unit, DataUnit)
        return task.data_unit

    async def annotate_task(
        self,
        task_id: int,
        data: dict[str, Any],
        schema: str | None = None,
        *,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        pid = self._project_of.pop(int(task_id), None)
        if pid is None:
            pid = (await self._execute(self._task_call(task_id))).get("project")
        info = await self.project_info(int(pid))  # type: ignore[arg-type]
        result, score = self._convert(task_id, data, info, image_size)
        if self.config.write is WriteAs.ANNOTATIONS:
            return await self._execute(self._annotation_call(task_id, result))
        await self._writer.put(int(pid), self._prediction(task_id, result, score))  # type: ignore[arg-type]
        return {"task": task_id}

    async def update_task(self, task_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        raise PlatformError("Label Studio has no task workflow: leave out on_success")

    async def submit_task(self, task_id: int) -> dict[str, Any]:
        raise PlatformError("Label Studio has no task workflow: leave out on_success")

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


class _TaskReader(_Gather):
    """Tasks read in one listing per chunk (`selectedItems`, `fields=all`: data, predictions and
    annotations) instead of one request each: Label Studio spends tens of ms of CPU per request."""

    def __init__(self, client: AsyncLabelStudioClient, chunk: int = 100, linger_s: float = 0.01):
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


class _BulkWriter(_Gather):
    """Predictions gathered for a moment and sent as one bulk import per chunk, one import at a
    time per client (Label Studio on SQLite answers concurrent writes with "database is locked").

    The import is all-or-nothing on a bad task id, so a refused chunk is split in halves and each
    half sent again, down to the one task the server refuses: only that task fails, with the
    server's reason. When the answer is lost (a 5xx, a timeout) or says fewer were created than sent
    (LS drops a result that does not fit its config without an error), the chunk's tasks are read
    back and only those without this run's prediction are sent again, once: nothing is written
    twice, and a task fails only when its prediction is not there."""

    def __init__(self, client: AsyncLabelStudioClient, chunk: int, linger_s: float):
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
        _settle(batch, None)

    async def _reconcile(self, project_id: int, batch: Pending, exc: Exception, retried: bool) -> None:
        """Settle what was written; send what was not once more (unless this was the second time)."""
        missing: Pending = []
        for item, fut in batch:
            try:
                raw = await self.client._read_task(project_id, item["task"])
            except Exception as read_error:  # the read-back failed: say so for this task
                _settle([(item, fut)], read_error)
                continue
            mv = self.client.config.model_version
            held = any(
                p.get("model_version") == mv for p in raw.get("predictions") or [] if isinstance(p, dict)
            )
            if held:
                _settle([(item, fut)], None)
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
