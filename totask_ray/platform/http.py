"""One request core for every platform client: a `Call` describes a request, `HttpCore` holds what
the blocking and the async client share (URLs, headers, retry decisions, error mapping, parsing),
and `BlockingHttp` / `AsyncHttp` run a call as a loop or a coroutine.

A platform client writes each endpoint once, as a `Call`, in a class that both flavours inherit,
so its sync and async clients cannot drift apart (the httpx pattern: one core, two transports).

Retries: 429/502/503/504 and transport errors, exponential backoff, `Retry-After` honoured. A
request that may have been applied is never replayed unless it is idempotent: a non-idempotent
POST is retried only when the server refused it before doing anything (429, 503) or the
connection was never made.

The async flavour speaks aiohttp directly (httpx's own async transport collapses under concurrency
on these machines, shared/reference/http-throughput-notes.md); an httpx transport may be given
instead, which tests use to inject faults.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlencode, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from totask_ray.net import wire as aio
from totask_ray.net.redact import redact_url
from totask_ray.net.retry import RetryPolicy, describe_transport_error
from totask_ray.platform.errors import (
    PlatformConnectionError,
    PlatformError,
    PlatformResponseError,
    http_error,
)

T = TypeVar("T")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class HttpSettings(BaseModel):
    """What every platform's settings hold for the request core: where, how long, how often.

    Each platform's config (`SynapseConfig`, `LabelStudioConfig`) subclasses it and adds its own
    credentials (`headers()`, `secrets()`); a field it needs with another default is declared again
    there. Frozen and picklable, so Ray workers get a copy; secrets stay `SecretStr`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # what a message shows as an example address, and the variable that gives it
    EXAMPLE_HOST: ClassVar[str] = "https://api.example.com"
    ENV_HOST: ClassVar[str] = "SYNAPSE_HOST"

    host: str
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
            raise ValueError(f"must be an http(s) URL such as {cls.EXAMPLE_HOST} (set {cls.ENV_HOST})")
        return v.strip().rstrip("/")

    def headers(self) -> dict[str, str]:
        return {"Accept": "application/json"}

    def secrets(self) -> list[str]:
        return []

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s)


def settings_error(exc: ValidationError, what: str) -> PlatformError:
    """A refused setting, said as `Bad <what> setting <field>: <why>` (no value: it may be a token)."""
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return PlatformError(f"Bad {what} setting {where}: {err['msg']}")


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


class HttpCore:
    """Everything both clients share: URLs, headers, retry decisions, error mapping, parsing."""

    def __init__(self, config: Any) -> None:
        self.config = config
        c = config
        self.retry = RetryPolicy(c.retries, c.backoff_s, c.max_backoff_s, c.max_retry_after_s)
        self._origin = urlsplit(c.host)
        self.extra_secrets: list[str] = []  # secrets learnt at run time (an access token)
        self.set_headers(c.headers())

    def set_headers(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.json_headers = {**headers, "Content-Type": "application/json"}

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
                call.method, self.label(call).split(" ", 1)[1], response.status_code, self.detail(response)
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
                f"{self.label(call)} answered with an unexpected shape: {short_error(exc)}"
            ) from None

    def detail(self, response: httpx.Response | aio.Reply) -> str:
        try:
            body = response.json()
        except ValueError:
            text = response.text[:200]
        else:
            listed = body.get("validation_errors") if isinstance(body, dict) else None
            if listed:  # Label Studio: "Validation error" in `detail`, the reasons beside it
                text = "; ".join(_flatten(listed))[:300]
            elif isinstance(body, dict) and isinstance(body.get("detail"), str):
                text = body["detail"]
            else:
                text = str(body)[:300]
        return self.scrub(text).strip()

    def scrub(self, text: str) -> str:
        for secret in [*self.config.secrets(), *self.extra_secrets]:
            if secret:
                text = text.replace(secret, "***")
        return text


def _flatten(errors: Any) -> list[str]:
    if isinstance(errors, dict):
        return [f"{k}: {m}" if k != "non_field_errors" else m for k, v in errors.items() for m in _flatten(v)]
    if isinstance(errors, list):
        return [m for e in errors for m in _flatten(e)]
    # Label Studio echoes a refused item whole ("{...} contains invalid ..."): keep the reason
    return [_ECHOED.sub("", str(errors))]


_ECHOED = re.compile(r"^\{.*\} (?=contains )", re.S)


def short_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False, include_input=False)[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)[:200]


def results(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("results"), list):
        return [r for r in body["results"] if isinstance(r, dict)]
    if isinstance(body, list):
        return [r for r in body if isinstance(r, dict)]
    raise ValueError("expected a paginated listing")


def as_dict(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body


class BlockingHttp:
    """The blocking flavour: httpx, for the driver and for people at a terminal or in a notebook."""

    _core: HttpCore

    def _init_http(self, config: Any, transport: httpx.BaseTransport | None) -> None:
        self._core = HttpCore(config)
        self._http = httpx.Client(
            timeout=config.timeout(),
            limits=httpx.Limits(max_connections=config.max_connections),
            transport=transport,
            follow_redirects=False,
        )

    def _execute(self, call: Call[T]) -> T:
        core = self._core
        url = core.url(call.path)
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, url, **core.request_kwargs(call))
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

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHttp:
    """The async flavour for the workers: one per actor, many requests in flight on one event loop.

    The session is made on first use, on the loop that uses it (aiohttp sessions belong to one)."""

    _core: HttpCore

    def _init_http(self, config: Any, transport: httpx.AsyncBaseTransport | None) -> None:
        self._core = HttpCore(config)
        self._httpx = (
            None
            if transport is None
            else httpx.AsyncClient(timeout=config.timeout(), transport=transport, follow_redirects=False)
        )
        self._session: Any = None
        self._timeout = aio.timeout(config.read_timeout_s, config.connect_timeout_s)

    async def _send(self, call: Call[Any], url: str) -> Any:
        """One attempt: the whole answer, or an httpx transport error."""
        if self._httpx is not None:
            response = await self._httpx.request(call.method, url, **self._core.request_kwargs(call))
            await response.aread()
            return response
        if self._session is None:
            self._session = aio.session(self._core.config.max_connections)
        if call.params:
            url = f"{url}?{urlencode(call.params)}"
        body = None if call.json is None else aio.dumps(call.json)
        headers = self._core.headers if body is None else self._core.json_headers
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

    async def aclose(self) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
