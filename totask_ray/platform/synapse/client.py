"""The Synapse REST client: httpx, one request core used by a sync and an async client.

Every endpoint method is written once: it describes a `Call` (method, path, params, body, how to
parse the answer) and hands it to `_execute`, which is a blocking loop in `SynapseClient` and a
coroutine in `AsyncSynapseClient`. The retry policy, header building, error mapping and parsing
live in `_Core`, shared by both, so the two clients cannot drift apart.

Retries: 429/502/503/504 and transport errors, exponential backoff, `Retry-After` honoured. A
request that may have been applied is never replayed unless it is idempotent: a non-idempotent
POST is retried only when the server refused it before doing anything (429, 503) or the
connection was never made.

The async client speaks aiohttp directly (httpx's own async transport collapses under concurrency
on these machines, shared/reference/http-throughput-notes.md, and its models on top of aiohttp
cost the workers as much CPU as the rest of a task: `totask_ray.net.wire`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import SecretStr, ValidationError

from totask_ray.platform.base import TaskIdPage
from totask_ray.platform.cli_options import CliOption
from totask_ray.platform.errors import PlatformError
from totask_ray.platform.http import (
    AsyncHttp,
    BlockingHttp,
    Call,
    HttpCore,
    HttpSettings,
    as_dict,
    results,
    settings_error,
)
from totask_ray.platform.models import (
    Agent,
    DataCollection,
    DataUnit,
    Job,
    PluginRelease,
    Project,
    Task,
)

# status and assignee: a re-run applies on_success only where the task is not there yet
TASK_FIELDS = "id,data,data_unit,status,assignee"


class SynapseConfig(HttpSettings):
    """Where the platform is and how to authenticate; picklable, so Ray workers get a copy.

    Secrets are `SecretStr`: they never show up in a repr, a log line or an error message.
    """

    access_token: SecretStr | None = None
    user_token: SecretStr | None = None
    tenant: SecretStr | None = None
    agent_token: SecretStr | None = None
    # Whether the task listing is read by id ranges (`ordering=id` with `id__gt` / `id__lte`, not in
    # the recorded contract): None checks, once per run on the driver, that the server honours them
    # (the embedded platform does) and reads offset pages where it does not; False never asks.
    id_ranges: bool | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> SynapseConfig:
        """Read the variables synapse-sdk reads: SYNAPSE_HOST, SYNAPSE_ACCESS_TOKEN or
        SYNAPSE_PLUGIN_RUN_USER_TOKEN, SYNAPSE_PLUGIN_RUN_TENANT, SYNAPSE_AGENT_TOKEN."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "host": env.get("SYNAPSE_HOST"),
            "access_token": env.get("SYNAPSE_ACCESS_TOKEN") or None,
            "user_token": env.get("SYNAPSE_PLUGIN_RUN_USER_TOKEN") or None,
            "tenant": env.get("SYNAPSE_PLUGIN_RUN_TENANT") or None,
            "agent_token": env.get("SYNAPSE_AGENT_TOKEN") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not values.get("host"):
            raise PlatformError("No platform address: pass --host or set SYNAPSE_HOST")
        if not values.get("access_token") and not values.get("user_token"):
            raise PlatformError(
                "No platform token: pass --token or set SYNAPSE_ACCESS_TOKEN (or SYNAPSE_PLUGIN_RUN_USER_TOKEN)"
            )
        try:
            return cls(**values)
        except ValidationError as exc:
            raise settings_error(exc, "platform") from None

    def for_job(self, job_name: str, project: int | None = None) -> SynapseConfig:
        """The config a run uses: a Synapse run needs nothing of the job's (the SDK's behaviour)."""
        return self

    def headers(self) -> dict[str, str]:
        h = super().headers()
        if self.access_token is not None:
            h["Synapse-Access-Token"] = f"Token {self.access_token.get_secret_value()}"
        elif self.user_token is not None:
            h["Authorization"] = f"Token {self.user_token.get_secret_value()}"
        if self.tenant is not None:
            h["Synapse-Tenant"] = f"Token {self.tenant.get_secret_value()}"
        if self.agent_token is not None:
            h["SYNAPSE-Agent"] = f"Token {self.agent_token.get_secret_value()}"
        return h

    def secrets(self) -> list[str]:
        return [
            s.get_secret_value()
            for s in (self.access_token, self.user_token, self.tenant, self.agent_token)
            if s is not None and s.get_secret_value()
        ]


CLI_OPTIONS = (
    CliOption("host", "host", "Platform URL", env="SYNAPSE_HOST"),
    CliOption("token", "access_token", "Access token; prefer the variable", env="SYNAPSE_ACCESS_TOKEN"),
    CliOption("tenant", "tenant", "Tenant", env="SYNAPSE_PLUGIN_RUN_TENANT"),
)


def encode_filters(filters: Mapping[str, Any]) -> dict[str, str]:
    """Task filters as query parameters: lists comma-joined, None as 'null' (unassigned)."""
    out: dict[str, str] = {}
    for key, value in filters.items():
        if value is None:
            out[key] = "null"
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, list | tuple | set):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = str(value)
    return out


def _page_of_ids(body: Any) -> TaskIdPage:
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise ValueError("a task listing must be an object with a 'results' list")
    count = body.get("count")
    if not isinstance(count, int) or count < 0:
        raise ValueError("a task listing must carry a non-negative 'count'")
    ids = []
    for item in body["results"]:
        tid = item.get("id") if isinstance(item, dict) else None
        if not isinstance(tid, int) or isinstance(tid, bool):
            raise ValueError("every listed task must carry an integer 'id'")
        ids.append(tid)
    nxt = body.get("next")
    if nxt is not None and not isinstance(nxt, str):
        raise ValueError("'next' must be a URL or null")
    return TaskIdPage(count=count, ids=ids, next=nxt)


class _Endpoints:
    """Each endpoint written once; `_execute` makes it blocking or awaitable."""

    name = "Synapse"
    _core: HttpCore

    _execute: Any  # the flavour (BlockingHttp, AsyncHttp) provides it

    @property
    def config(self) -> SynapseConfig:
        return self._core.config

    def get_project(self, project_id: int) -> Any:
        return self._execute(Call("GET", f"projects/{int(project_id)}/", Project.model_validate))

    def get_data_collection(self, collection_id: int) -> Any:
        return self._execute(
            Call(
                "GET",
                f"data_collections/{int(collection_id)}/",
                DataCollection.model_validate,
                params={"expand": "file_specifications"},
            )
        )

    def get_task(self, task_id: int) -> Any:
        return self._execute(
            Call(
                "GET",
                f"tasks/{int(task_id)}/",
                Task.model_validate,
                params={"fields": TASK_FIELDS, "expand": "data_unit"},
            )
        )

    def get_data_unit(self, data_unit_id: int) -> Any:
        return self._execute(
            Call(
                "GET", f"data_units/{int(data_unit_id)}/", DataUnit.model_validate, params={"expand": "files"}
            )
        )

    def annotate_task(
        self,
        task: Task,
        data: dict[str, Any],
        schema: str | None = None,
        *,
        image_size: tuple[int, int] | None = None,
    ) -> Any:
        """PUT the task's annotation data (idempotent: the same body twice leaves the same state).
        Synapse stores pixel coordinates, so `image_size` is not needed."""
        return self._execute(
            Call(
                "PUT",
                f"tasks/{int(task.id)}/annotate_task_data/",
                as_dict,
                params={"schema": "any"} if schema == "any" else None,
                json={"action": "submit", "data": data},
            )
        )

    def update_task(self, task_id: int, changes: dict[str, Any]) -> Any:
        """A workflow change (status, assignee): absolute values, so a replay is harmless."""
        return self._execute(Call("PATCH", f"tasks/{int(task_id)}/", as_dict, json=changes, idempotent=True))

    def submit_task(self, task_id: int) -> Any:
        """Move a task to the next workflow stage (not replayable: it advances once per call)."""
        return self._execute(Call("POST", f"tasks/{int(task_id)}/submit/", as_dict, json={}))

    def task_id_page(
        self, project_id: int, filters: Mapping[str, Any], *, page: int = 1, page_size: int | None = None
    ) -> Any:
        params = {
            **encode_filters(filters),
            "project": str(int(project_id)),
            "fields": "id",
            "page_size": str(page_size or self.config.page_size),
        }
        if page > 1:
            params["page"] = str(page)
        return self._execute(Call("GET", "sdk/tasks/", _page_of_ids, params=params))

    def _id_call(
        self, project_id: int, filters: Mapping[str, Any], size: int, **extra: str
    ) -> Call[TaskIdPage]:
        """A listing page in id order; `extra` (`ordering`, `id__gt`, `id__lte`) replaces a filter
        of the same name: a range is always inside the filters' own bounds (it is cut from them)."""
        params = {
            **encode_filters(filters),
            "project": str(int(project_id)),
            "fields": "id",
            "page_size": str(size),
            "ordering": "id",
            **extra,
        }
        return Call("GET", "sdk/tasks/", _page_of_ids, params=params)

    def task_id_range_page(
        self,
        project_id: int,
        filters: Mapping[str, Any],
        *,
        after: int,
        upto: int,
        page_size: int | None = None,
    ) -> Any:
        size = page_size or self.config.page_size
        return self._execute(
            self._id_call(project_id, filters, size, id__gt=str(int(after)), id__lte=str(int(upto)))
        )

    def next_task_id_page(self, next_url: str) -> Any:
        return self._execute(Call("GET", next_url, _page_of_ids))

    def get_plugin_release(self, release_id: int) -> Any:
        return self._execute(Call("GET", f"plugin_releases/{int(release_id)}/", PluginRelease.model_validate))

    def list_serve_applications(self, plugin_code: str, agent: int | None = None) -> Any:
        params = {"plugin_code": plugin_code}
        if agent is not None:
            params["job__agent"] = str(agent)
        return self._execute(Call("GET", "serve_applications/", results, params=params))

    def run_plugin(self, code: str, body: dict[str, Any]) -> Any:
        return self._execute(Call("POST", f"plugins/{code}/run/", lambda b: b, json=body))

    def get_agent(self, agent_id: int) -> Any:
        def first(body: Any) -> Agent | None:
            rows = results(body)
            return Agent.model_validate(rows[0]) if rows else None

        return self._execute(Call("GET", "agents/", first, params={"id": str(int(agent_id))}))

    def create_job(self, body: dict[str, Any]) -> Any:
        return self._execute(Call("POST", "jobs/", Job.model_validate, json=body))

    def get_job(self, job_id: int) -> Any:
        return self._execute(Call("GET", f"jobs/{int(job_id)}/", Job.model_validate))

    def update_job(self, job_id: int, changes: dict[str, Any]) -> Any:
        # Job records are absolute snapshots (status, counts), so replaying a PATCH is harmless.
        return self._execute(Call("PATCH", f"jobs/{int(job_id)}/", as_dict, json=changes, idempotent=True))

    def post_logs(self, events: list[dict[str, Any]]) -> Any:
        return self._execute(Call("POST", "logs/", lambda b: b, json=events))


class SynapseClient(_Endpoints, BlockingHttp):
    """Blocking client, for the driver and for people at a terminal or in a notebook."""

    supports_workflow = True

    def __init__(self, config: SynapseConfig, *, transport: httpx.BaseTransport | None = None):
        self._init_http(config, transport)

    def iter_task_ids(
        self, project_id: int, filters: Mapping[str, Any], page_size: int | None = None
    ) -> Iterator[int]:
        """Every matching task id, one page in memory at a time, following `next` as given."""
        page = self.task_id_page(project_id, filters, page_size=page_size)
        while True:
            yield from page.ids
            if not page.next:
                return
            page = self.next_task_id_page(page.next)

    def count_tasks(self, project_id: int, filters: Mapping[str, Any]) -> int:
        return self.task_id_page(project_id, filters, page_size=1).count

    def id_bounds(self, project_id: int, filters: Mapping[str, Any]) -> tuple[int, int] | None:
        """The lowest and highest matching ids where the server orders by id and applies `id__gt`
        and `id__lte` (`IdRanges`), else None (offset pages).

        The Synapse contract records neither (`sdk/tasks/` is read by DRF page numbers), so unless
        the config says `id_ranges=True` the answers are checked, 4 small requests once a run: the
        first two ids ascending, the last id with `ordering=-id`, and `id__gt` / `id__lte` at the
        first id giving the second id and a count of 1. A server that ignores any of them fails a
        check and is read by offset pages, as before.
        """
        if self.config.id_ranges is False or {"limit", "ordering", "page", "page_size"} & set(filters):
            return None  # `limit` keeps the first N of the whole listing: ranges would change it
        try:
            first = self._execute(self._id_call(project_id, filters, 2))
            last = self._execute(self._id_call(project_id, filters, 1, ordering="-id"))
            if not first.ids or not last.ids:
                return None
            lo, hi = first.ids[0], last.ids[0]
            if self.config.id_ranges is None:
                if first.count >= 2:
                    after = self._execute(self._id_call(project_id, filters, 1, id__gt=str(lo)))
                    upto = self._execute(self._id_call(project_id, filters, 1, id__lte=str(lo)))
                    honoured = (
                        len(first.ids) == 2
                        and lo < first.ids[1] <= hi
                        and after.ids == first.ids[1:]
                        and after.count == first.count - 1
                        and upto.ids == [lo]
                        and upto.count == 1
                    )
                else:
                    honoured = lo == hi and last.count == first.count == 1
                if not honoured:
                    return None
        except PlatformError as exc:
            if getattr(exc, "status_code", None) == 400:  # it refuses the parameters: offset pages
                return None
            raise
        return lo, hi


class AsyncSynapseClient(_Endpoints, AsyncHttp):
    """Async client for the workers: one per actor, many requests in flight on one event loop.

    It speaks aiohttp directly (`totask_ray.platform.http`: the per-request CPU of httpx's models
    bounded the workers). An httpx `transport` may be given instead: tests inject platform faults
    through it.
    """

    needs_image_size = False  # coordinates are pixels

    def __init__(self, config: SynapseConfig, *, transport: httpx.AsyncBaseTransport | None = None):
        self._init_http(config, transport)

    async def media_headers(self, url: str) -> dict[str, str]:
        """Synapse's media URLs are signed: they carry their own credentials."""
        return {}

    async def iter_task_ids(
        self, project_id: int, filters: Mapping[str, Any], page_size: int | None = None
    ) -> AsyncIterator[int]:
        page = await self.task_id_page(project_id, filters, page_size=page_size)
        while True:
            for tid in page.ids:
                yield tid
            if not page.next:
                return
            page = await self.next_task_id_page(page.next)


def page_number(next_url: str | None) -> int | None:
    """The page number a DRF `next` link points at (for splitting a listing across readers)."""
    if not next_url:
        return None
    values = parse_qs(urlsplit(next_url).query).get("page")
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None
