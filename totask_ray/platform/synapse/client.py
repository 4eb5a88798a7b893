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

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from totask_ray.net import wire as aio
from totask_ray.net.redact import redact_url
from totask_ray.net.retry import RetryPolicy, describe_transport_error
from totask_ray.platform.base import TaskIdPage
from totask_ray.platform.errors import (
    PlatformConnectionError,
    PlatformError,
    PlatformResponseError,
    http_error,
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

T = TypeVar("T")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# status and assignee: a re-run applies on_success only where the task is not there yet
TASK_FIELDS = "id,data,data_unit,status,assignee"


class SynapseConfig(BaseModel):
    """Where the platform is and how to authenticate; picklable, so Ray workers get a copy.

    Secrets are `SecretStr`: they never show up in a repr, a log line or an error message.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    access_token: SecretStr | None = None
    user_token: SecretStr | None = None
    tenant: SecretStr | None = None
    agent_token: SecretStr | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=15.0, gt=0)
    retries: int = Field(default=5, ge=0, le=20)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=30.0, gt=0)
    max_retry_after_s: float = Field(default=60.0, gt=0)
    page_size: int = Field(default=100, ge=1, le=1000)
    max_connections: int = Field(default=100, ge=1)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://api.example.com (set SYNAPSE_HOST)")
        return v.strip().rstrip("/")

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
            err = exc.errors(include_url=False, include_input=False)[0]
            raise PlatformError(f"Bad platform setting {err['loc'][0]}: {err['msg']}") from None

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/json"}
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

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer."""

    method: str
    path: str  # relative to the host, or an absolute `next` link on the same origin
    parse: Callable[[Any], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    idempotent: bool | None = None  # None: decided by the method
    expect_json: bool = True

    @property
    def replayable(self) -> bool:
        return self.method in IDEMPOTENT_METHODS if self.idempotent is None else self.idempotent


@dataclass
class _Core:
    """Everything both clients share: URLs, headers, retry decisions, error mapping, parsing."""

    config: SynapseConfig
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.headers = self.config.headers()
        c = self.config
        self.retry = RetryPolicy(c.retries, c.backoff_s, c.max_backoff_s, c.max_retry_after_s)
        self._origin = urlsplit(self.config.host)

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            parts = urlsplit(path)
            # A `next` link on another origin would receive our token: refuse it.
            if (parts.scheme, parts.netloc) != (self._origin.scheme, self._origin.netloc):
                raise PlatformResponseError(
                    f"the platform returned a link to another host ({redact_url(path)}); refusing to follow it"
                )
            return path
        return f"{self.config.host}/{path.lstrip('/')}"

    def label(self, call: Call[Any]) -> str:
        path = urlsplit(call.path).path if call.path.startswith("http") else call.path
        return f"{call.method} {path.lstrip('/')}"

    def request_kwargs(self, call: Call[Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {"headers": self.headers}
        if call.params:
            kw["params"] = call.params
        if call.json is not None:
            kw["json"] = call.json
        return kw

    def retry_delay(
        self,
        call: Call[Any],
        attempt: int,
        response: httpx.Response | aio.Reply | None = None,
        exc: Exception | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when this outcome is final."""
        return self.retry.delay(attempt, replayable=call.replayable, response=response, exc=exc)

    def connection_error(self, call: Call[Any], exc: Exception) -> PlatformConnectionError:
        what = describe_transport_error(exc)
        return PlatformConnectionError(
            f"{self.label(call)} {what} ({type(exc).__name__}) at {redact_url(self.config.host)}"
        )

    def finish(self, call: Call[T], response: httpx.Response | aio.Reply) -> T:
        if response.status_code >= 400:
            raise http_error(
                call.method, self.label(call).split(" ", 1)[1], response.status_code, self._detail(response)
            )
        if not call.expect_json:
            return call.parse(None)
        try:
            body = response.json() if response.content else None
        except ValueError:
            raise PlatformResponseError(f"{self.label(call)} answered with a body that is not JSON") from None
        try:
            return call.parse(body)
        except (ValidationError, ValueError, TypeError, KeyError) as exc:
            raise PlatformResponseError(
                f"{self.label(call)} answered with an unexpected shape: {_short(exc)}"
            ) from None

    def _detail(self, response: httpx.Response | aio.Reply) -> str:
        try:
            body = response.json()
        except ValueError:
            text = response.text[:200]
        else:
            if isinstance(body, dict) and isinstance(body.get("detail"), str):
                text = body["detail"]
            else:
                text = str(body)[:300]
        for secret in self.config.secrets():
            text = text.replace(secret, "***")
        return text.strip()


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False, include_input=False)[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)[:200]


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


def _results(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("results"), list):
        return [r for r in body["results"] if isinstance(r, dict)]
    if isinstance(body, list):
        return [r for r in body if isinstance(r, dict)]
    raise ValueError("expected a paginated listing")


def _dict(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


class _Endpoints:
    """Each endpoint written once; `_execute` makes it blocking or awaitable."""

    _core: _Core

    def _execute(self, call: Call[Any]) -> Any:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

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

    def annotate_task(self, task_id: int, data: dict[str, Any], schema: str | None = None) -> Any:
        """PUT the task's annotation data (idempotent: the same body twice leaves the same state)."""
        return self._execute(
            Call(
                "PUT",
                f"tasks/{int(task_id)}/annotate_task_data/",
                _dict,
                params={"schema": "any"} if schema == "any" else None,
                json={"action": "submit", "data": data},
            )
        )

    def update_task(self, task_id: int, changes: dict[str, Any]) -> Any:
        """A workflow change (status, assignee): absolute values, so a replay is harmless."""
        return self._execute(Call("PATCH", f"tasks/{int(task_id)}/", _dict, json=changes, idempotent=True))

    def submit_task(self, task_id: int) -> Any:
        """Move a task to the next workflow stage (not replayable: it advances once per call)."""
        return self._execute(Call("POST", f"tasks/{int(task_id)}/submit/", _dict, json={}))

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

    def next_task_id_page(self, next_url: str) -> Any:
        return self._execute(Call("GET", next_url, _page_of_ids))

    def get_plugin_release(self, release_id: int) -> Any:
        return self._execute(Call("GET", f"plugin_releases/{int(release_id)}/", PluginRelease.model_validate))

    def list_serve_applications(self, plugin_code: str, agent: int | None = None) -> Any:
        params = {"plugin_code": plugin_code}
        if agent is not None:
            params["job__agent"] = str(agent)
        return self._execute(Call("GET", "serve_applications/", _results, params=params))

    def run_plugin(self, code: str, body: dict[str, Any]) -> Any:
        return self._execute(Call("POST", f"plugins/{code}/run/", lambda b: b, json=body))

    def get_agent(self, agent_id: int) -> Any:
        def first(body: Any) -> Agent | None:
            rows = _results(body)
            return Agent.model_validate(rows[0]) if rows else None

        return self._execute(Call("GET", "agents/", first, params={"id": str(int(agent_id))}))

    def create_job(self, body: dict[str, Any]) -> Any:
        return self._execute(Call("POST", "jobs/", Job.model_validate, json=body))

    def get_job(self, job_id: int) -> Any:
        return self._execute(Call("GET", f"jobs/{int(job_id)}/", Job.model_validate))

    def update_job(self, job_id: int, changes: dict[str, Any]) -> Any:
        # Job records are absolute snapshots (status, counts), so replaying a PATCH is harmless.
        return self._execute(Call("PATCH", f"jobs/{int(job_id)}/", _dict, json=changes, idempotent=True))

    def post_logs(self, events: list[dict[str, Any]]) -> Any:
        return self._execute(Call("POST", "logs/", lambda b: b, json=events))


class SynapseClient(_Endpoints):
    """Blocking client, for the driver and for people at a terminal or in a notebook."""

    def __init__(self, config: SynapseConfig, *, transport: httpx.BaseTransport | None = None):
        self._core = _Core(config)
        self._http = httpx.Client(
            timeout=config.timeout(),
            limits=httpx.Limits(max_connections=config.max_connections),
            transport=transport,
            follow_redirects=False,
        )

    def _execute(self, call: Call[T]) -> T:
        core = self._core
        url = core.url(call.path)
        kwargs = core.request_kwargs(call)
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, url, **kwargs)
            except httpx.TransportError as exc:
                delay = core.retry_delay(call, attempt, exc=exc)
                if delay is None:
                    raise core.connection_error(call, exc) from exc
            else:
                delay = core.retry_delay(call, attempt, response=response)
                if delay is None:
                    return core.finish(call, response)
            attempt += 1
            time.sleep(delay)

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

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SynapseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSynapseClient(_Endpoints):
    """Async client for the workers: one per actor, many requests in flight on one event loop.

    It speaks aiohttp directly (`totask_ray.net.wire`: the per-request CPU of httpx's models bounded the
    workers). An httpx `transport` may be given instead: tests inject platform faults through it.
    The session is made on first use, on the loop that uses it (aiohttp sessions belong to one).
    """

    def __init__(self, config: SynapseConfig, *, transport: httpx.AsyncBaseTransport | None = None):
        self._core = _Core(config)
        self._httpx = (
            None
            if transport is None
            else httpx.AsyncClient(timeout=config.timeout(), transport=transport, follow_redirects=False)
        )
        self._session: Any = None
        self._timeout = aio.timeout(config.read_timeout_s, config.connect_timeout_s)
        self._json_headers = {**self._core.headers, "Content-Type": "application/json"}

    async def _send(self, call: Call[Any], url: str) -> Any:
        """One attempt: the whole answer, or an httpx transport error."""
        if self._httpx is not None:
            response = await self._httpx.request(call.method, url, **self._core.request_kwargs(call))
            await response.aread()
            return response
        if self._session is None:
            self._session = aio.session(self.config.max_connections)
        if call.params:
            url = f"{url}?{urlencode(call.params)}"
        body = None if call.json is None else aio.dumps(call.json)
        headers = self._core.headers if body is None else self._json_headers
        with aio.transport_errors():
            async with self._session.request(
                call.method,
                aio.url(url),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._timeout,
            ) as resp:
                return aio.Reply(resp.status, resp.headers, await resp.read())

    async def _execute(self, call: Call[T]) -> T:
        core = self._core
        url = core.url(call.path)
        attempt = 0
        while True:
            try:
                response = await self._send(call, url)
            except httpx.TransportError as exc:
                delay = core.retry_delay(call, attempt, exc=exc)
                if delay is None:
                    raise core.connection_error(call, exc) from exc
            else:
                delay = core.retry_delay(call, attempt, response=response)
                if delay is None:
                    return core.finish(call, response)
            attempt += 1
            await asyncio.sleep(delay)

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

    async def aclose(self) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncSynapseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def page_number(next_url: str | None) -> int | None:
    """The page number a DRF `next` link points at (for splitting a listing across readers)."""
    if not next_url:
        return None
    values = parse_qs(urlsplit(next_url).query).get("page")
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None
