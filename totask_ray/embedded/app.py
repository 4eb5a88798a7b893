"""The embedded platform's ASGI app: the Synapse REST contract over a `Store`, on Starlette.

Every endpoint is `async def` and its SQLite calls are short (see the throughput notes). An outer
ASGI gate does what applies to every request before routing: the optional latency, token and
tenant checks (401/403 with nothing else in the body), and injected faults. Errors are DRF-shaped
JSON: `{"detail": ...}` or `{"field": ["message"]}`.

Beyond the contract, a few extensions live under `/_local/` (seeding, annotation history, fault
injection) plus `POST jobs/`, `GET logs/` and `PATCH tasks/{id}/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import json
import mimetypes
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .store import JOB_STATUSES, TASK_FIELDS, Store, TaskQuery, format_ts, parse_ts
from .workflow import submitted_status, transition_error

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MEDIA_URL_TTL_S = 3600
MAX_SEED_TASKS = 1_000_000
MAX_ID_IN = 10_000
NO_RUNNER_DETAIL = "No Ray cluster is attached to this platform; start it with one to run plugins."

TASK_FILTERS = (
    "project",
    "status",
    "status__in",
    "data_collection",
    "assignee",
    "created_at__gte",
    "created_at__lte",
    "id__in",
    "limit",
)
# `url_host` is sent by SDK clients built with one; the real backend reads it and moves on.
IGNORED_PARAMS = ("url_host",)
_TASK_LIST_PARAMS = frozenset((*TASK_FILTERS, "fields", "expand", "page", "page_size", *IGNORED_PARAMS))
RUN_KEYS = ("agent", "action", "params", "storage_id", "job_id", "debug", "version", "language")
JOB_PATCH_KEYS = ("status", "progress_record", "metrics_record", "result")
LOG_KEYS = ("event", "data", "datetime", "job", "step", "level")


# -- the plugin runner protocol -----------------------------------------------------------------


@runtime_checkable
class PluginRunner(Protocol):
    """What `POST plugins/{code}/run/` hands its work to (a Ray-backed one runs Serve apps).

    `release` is the plugin release as `GET plugin_releases/{id}/` shows it; `agent` the agent as
    `GET agents/` shows it, or None. `deploy` returns a JSON object merged into the response after
    `job_id`; `infer` returns the response body. Raise `PluginRunError` to answer with a status.
    Optional: `attach(store)` is called once at startup, `aclose()` (async) at shutdown.
    """

    async def deploy(self, release: dict, params: dict, agent: dict | None, job_id: int) -> dict: ...

    async def infer(self, release: dict, body: dict) -> Any: ...


class PluginRunError(Exception):
    """Raised by a plugin runner to answer `plugins/{code}/run/` with `status_code` and `detail`."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


# -- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: `body` is the JSON to send (a DRF-style dict or list)."""

    def __init__(self, status_code: int, body: Any, headers: dict[str, str] | None = None):
        super().__init__(status_code)
        self.status_code = status_code
        self.body = body
        self.headers = headers


def _invalid(field_name: str, message: str) -> ApiError:
    return ApiError(400, {field_name: [message]})


def _not_found() -> ApiError:
    return ApiError(404, {"detail": "Not found."})


_STATUS_DETAIL = {
    404: "Not found.",
    429: "Request was throttled.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service temporarily unavailable.",
    504: "Gateway timeout.",
}


# -- faults ---------------------------------------------------------------------------------------


@dataclass
class FaultConfig:
    error_rate: float = 0.0
    statuses: list[int] = field(default_factory=lambda: [503])
    retry_after_s: float = 1.0
    slow_rate: float = 0.0
    slow_s: float = 0.0
    path_regex: str | None = None
    methods: list[str] | None = None
    seed: int = 0


class Faults:
    """Injected faults for matching requests: errors answered before the handler, or slowness."""

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.pattern = re.compile(cfg.path_regex) if cfg.path_regex else None
        self.methods = {m.upper() for m in cfg.methods} if cfg.methods else None
        self.stats = {"matched": 0, "errors": 0, "slowed": 0, "by_status": {}}

    def decide(self, method: str, path: str) -> tuple[str, float] | None:
        if self.methods is not None and method not in self.methods:
            return None
        if self.pattern is not None and not self.pattern.search(path):
            return None
        self.stats["matched"] += 1
        if self.cfg.error_rate > 0 and self.rng.random() < self.cfg.error_rate:
            status = self.rng.choice(self.cfg.statuses)
            self.stats["errors"] += 1
            by = self.stats["by_status"]
            by[str(status)] = by.get(str(status), 0) + 1
            return ("error", status)
        if self.cfg.slow_rate > 0 and self.rng.random() < self.cfg.slow_rate:
            self.stats["slowed"] += 1
            return ("slow", self.cfg.slow_s)
        return None


def _parse_fault_config(body: Any) -> FaultConfig:
    if not isinstance(body, dict):
        raise ApiError(400, {"non_field_errors": ["Expected a JSON object."]})
    known = FaultConfig.__dataclass_fields__
    errors: dict[str, list[str]] = {k: ["Unknown field."] for k in body if k not in known}
    cfg = FaultConfig()

    def num(name: str, lo: float, hi: float | None) -> None:
        if name not in body:
            return
        v = body[name]
        if isinstance(v, bool) or not isinstance(v, int | float) or v < lo or (hi is not None and v > hi):
            errors[name] = [f"Must be a number in [{lo}, {hi if hi is not None else 'inf'}]."]
        else:
            setattr(cfg, name, float(v))

    num("error_rate", 0.0, 1.0)
    num("slow_rate", 0.0, 1.0)
    num("retry_after_s", 0.0, None)
    num("slow_s", 0.0, 600.0)
    if "statuses" in body:
        st = body["statuses"]
        if (
            not isinstance(st, list)
            or not st
            or not all(isinstance(s, int) and not isinstance(s, bool) and 400 <= s <= 599 for s in st)
        ):
            errors["statuses"] = ["Must be a non-empty list of HTTP error statuses (400-599)."]
        else:
            cfg.statuses = list(st)
    if body.get("path_regex") is not None:
        try:
            re.compile(body["path_regex"])
            cfg.path_regex = body["path_regex"]
        except (re.error, TypeError):
            errors["path_regex"] = ["Must be a valid regular expression."]
    if body.get("methods") is not None:
        ms = body["methods"]
        if not isinstance(ms, list) or not all(isinstance(m, str) and m for m in ms):
            errors["methods"] = ["Must be a list of HTTP method names."]
        else:
            cfg.methods = [m.upper() for m in ms]
    if "seed" in body:
        if not isinstance(body["seed"], int) or isinstance(body["seed"], bool):
            errors["seed"] = ["A valid integer is required."]
        else:
            cfg.seed = body["seed"]
    if errors:
        raise ApiError(400, errors)
    return cfg


# -- the gate: latency, auth, tenant, faults --------------------------------------------------------


async def _send_json(send: Callable, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _format_seconds(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


class _Gate:
    """Outer ASGI middleware; see the module docstring."""

    def __init__(self, app: Any, state: _State):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        if st.latency_s > 0:
            await asyncio.sleep(st.latency_s)
        path: str = scope["path"]
        if path == "/health/":
            await self.app(scope, receive, send)
            return
        if not path.startswith("/media/"):  # media checks its signature or the token itself
            problem = st.check_auth(scope["headers"])
            if problem is not None:
                status, detail = problem
                extra = {"WWW-Authenticate": "Token"} if status == 401 else None
                await _send_json(send, status, {"detail": detail}, extra)
                return
        faults = st.faults
        if faults is not None and not path.startswith("/_local/"):
            decision = faults.decide(scope["method"], path)
            if decision is not None:
                kind, value = decision
                if kind == "error":
                    status = int(value)
                    extra = None
                    if status in (429, 503):
                        extra = {"Retry-After": _format_seconds(faults.cfg.retry_after_s)}
                    detail = f"Injected fault: {_STATUS_DETAIL.get(status, 'error')}"
                    await _send_json(send, status, {"detail": detail}, extra)
                    return
                await asyncio.sleep(value)
        await self.app(scope, receive, send)


# -- state shared by the endpoints ------------------------------------------------------------------


class _State:
    def __init__(
        self,
        store: Store,
        media_dir: Path,
        token: str,
        tenant: str | None,
        latency_ms: float,
        fault_injection: bool,
        plugin_runner: Any,
    ):
        if not token:
            raise ValueError("the platform needs a non-empty token")
        self.store = store
        self.media_dir = Path(media_dir)
        self.media_dir.mkdir(parents=True, exist_ok=True)
        self.media_root = os.path.realpath(self.media_dir)
        self.token = token
        self._token_b = token.encode()
        self._tenant_b = tenant.encode() if tenant else None
        self.tenant = tenant
        self.latency_s = max(0.0, float(latency_ms)) / 1000.0
        self.fault_injection = fault_injection
        self.faults: Faults | None = None
        self.plugin_runner = plugin_runner
        self._sign_key = _media_key(token)

    # auth
    def _token_ok(self, value: bytes) -> bool:
        keyword, _, rest = value.partition(b" ")
        return keyword.lower() == b"token" and hmac.compare_digest(rest.strip(), self._token_b)

    def check_auth(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        given = False
        ok = False
        tenant: bytes | None = None
        for name, value in headers:
            if name in (b"synapse-access-token", b"authorization"):
                given = True
                if not ok and self._token_ok(value):
                    ok = True
            elif name == b"synapse-tenant":
                tenant = value
        if not given:
            return 401, "Authentication credentials were not provided."
        if not ok:
            return 401, "Invalid token."
        if self._tenant_b is not None:
            keyword, _, rest = (tenant or b"").partition(b" ")
            if keyword.lower() != b"token" or not hmac.compare_digest(rest.strip(), self._tenant_b):
                return 403, "You do not have permission to perform this action: wrong or missing tenant."
        return None

    def header_token_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return any(n in (b"synapse-access-token", b"authorization") and self._token_ok(v) for n, v in headers)

    # signed media URLs
    def sign(self, rel_path: str, expires: int) -> str:
        return _sign(self._sign_key, rel_path, expires)

    def media_url(self, base: str, rel_path: str, expires: int) -> str:
        return f"{base}/media/{quote(rel_path, safe='/')}?expires={expires}&signature={self.sign(rel_path, expires)}"


def _media_key(token: str) -> bytes:
    return hmac.new(token.encode(), b"totask-ray media url signing v1", hashlib.sha256).digest()


def _sign(key: bytes, rel_path: str, expires: int) -> str:
    return hmac.new(key, f"{rel_path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def media_signature(token: str, rel_path: str, expires: int) -> str:
    """The `signature` of a media URL for `rel_path` (relative to the media dir) valid until the
    unix time `expires`: HMAC-SHA256 under a key derived from the platform's token."""
    return _sign(_media_key(token), rel_path, expires)


# -- helpers --------------------------------------------------------------------------------------


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise ApiError(400, {"detail": "JSON parse error - the request has no body."})
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, {"detail": f"JSON parse error - {exc}"}) from None


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(
            400,
            {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(body).__name__}."]},
        )
    return body


def _unknown_keys(body: dict, allowed: tuple[str, ...] | frozenset[str]) -> dict[str, list[str]]:
    return {k: [f"Unknown field. Allowed fields: {', '.join(allowed)}."] for k in body if k not in allowed}


_INT = re.compile(r"\s*-?[0-9]{1,18}\s*")


def _int_param(name: str, raw: str, *, minimum: int | None = None) -> int:
    if not isinstance(raw, str) or not _INT.fullmatch(raw):
        raise _invalid(name, "A valid integer is required.")
    v = int(raw)
    if minimum is not None and v < minimum:
        raise _invalid(name, f"Ensure this value is greater than or equal to {minimum}.")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _csv(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def _page_params(request: Request) -> tuple[int, int]:
    qp = request.query_params
    page_size = DEFAULT_PAGE_SIZE
    if "page_size" in qp:
        page_size = min(_int_param("page_size", qp["page_size"], minimum=1), MAX_PAGE_SIZE)
    page = 1
    if "page" in qp:
        try:
            page = int(qp["page"])
        except ValueError:
            raise ApiError(404, {"detail": "Invalid page."}) from None
        if page < 1:
            raise ApiError(404, {"detail": "Invalid page."})
    return page, page_size


def _paginated(request: Request, count: int, page: int, page_size: int, results: list) -> dict:
    if page > 1 and (page - 1) * page_size >= count:
        raise ApiError(404, {"detail": "Invalid page."})
    nxt = str(request.url.include_query_params(page=page + 1)) if page * page_size < count else None
    prev = None
    if page > 1:
        url = request.url
        prev = str(url.remove_query_params("page") if page == 2 else url.include_query_params(page=page - 1))
    return {"count": count, "next": nxt, "previous": prev, "results": results}


def _check_page(count: int, page: int, page_size: int) -> int:
    offset = (page - 1) * page_size
    if page > 1 and offset >= count:
        raise ApiError(404, {"detail": "Invalid page."})
    return offset


def _only_params(request: Request, allowed: frozenset[str], what: str = "filter") -> None:
    unknown = [k for k in request.query_params if k not in allowed]
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ApiError(400, {k: [f"Unknown {what} '{k}'. Known: {known}."] for k in unknown})


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# -- serializers ----------------------------------------------------------------------------------


class _Serializer:
    """Turns store rows into response objects for one request (one base URL, one expiry)."""

    def __init__(self, state: _State, request: Request):
        self.state = state
        self.base = _base_url(request)
        self.expires = int(time.time()) + MEDIA_URL_TTL_S

    def files(self, files: list[dict]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for f in files:
            name = f["specification_name"]
            if name in out:
                continue
            url = (
                f["url"] if f["url"] is not None else self.state.media_url(self.base, f["path"], self.expires)
            )
            out[name] = {
                "url": url,
                "is_primary": f["is_primary"],
                "file_name_original": f["file_name_original"],
                "file_type": f["file_type"],
            }
        return out

    def data_unit(self, du_id: int, expand_files: bool) -> dict | None:
        found = self.state.store.data_unit_with_files(du_id)
        if found is None:
            return None
        du, files = found
        du["files"] = self.files(files) if expand_files else [f["id"] for f in files]
        return du

    def task(self, task: dict, fields: list[str] | None, expand: set[str]) -> dict:
        keys = TASK_FIELDS if fields is None else [f for f in fields if f in TASK_FIELDS]
        out = {k: task[k] for k in keys}
        if "data_unit" in out and "data_unit" in expand and task["data_unit"] is not None:
            out["data_unit"] = self.data_unit(task["data_unit"], expand_files=True)
        return out


def _fields_expand(request: Request) -> tuple[list[str] | None, set[str]]:
    qp = request.query_params
    fields = _csv(qp.getlist("fields")) if "fields" in qp else None
    expand = set(_csv(qp.getlist("expand")))
    return fields or None, expand


# -- the app --------------------------------------------------------------------------------------


def create_app(
    store: Store,
    media_dir: str | Path,
    token: str,
    tenant: str | None = None,
    latency_ms: float = 0,
    fault_injection: bool = False,
    plugin_runner: Any = None,
) -> Any:
    """The platform as an ASGI app. See the module docstring and the REST contract."""
    st = _State(store, Path(media_dir), token, tenant, latency_ms, fault_injection, plugin_runner)

    # -- basics --
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_project(request: Request) -> Response:
        p = st.store.get_project(request.path_params["id"])
        if p is None:
            raise _not_found()
        return JSONResponse(p)

    async def get_data_collection(request: Request) -> Response:
        dc = st.store.get_data_collection(request.path_params["id"])
        if dc is None:
            raise _not_found()
        specs = st.store.file_specifications(dc["id"])
        _, expand = _fields_expand(request)
        dc["file_specifications"] = specs if "file_specifications" in expand else [s["id"] for s in specs]
        return JSONResponse(dc)

    # -- tasks --
    def task_query(request: Request) -> TaskQuery:
        qp = request.query_params
        _only_params(request, _TASK_LIST_PARAMS)
        if not qp.get("project", "").strip():
            raise _invalid("project", "This field is required.")
        q = TaskQuery(project=_int_param("project", qp["project"]))
        if st.store.get_project(q.project) is None:
            raise _invalid("project", f"Select a valid choice. Project {q.project} does not exist.")
        if "status" in qp:
            q.statuses = [qp.getlist("status")[-1]]
        if "status__in" in qp:
            q.status_in = _csv(qp.getlist("status__in"))
        if "data_collection" in qp:
            q.data_collection = _int_param("data_collection", qp.getlist("data_collection")[-1])
            if st.store.get_data_collection(q.data_collection) is None:
                raise _invalid(
                    "data_collection",
                    f"Select a valid choice. Data collection {q.data_collection} does not exist.",
                )
        if "assignee" in qp:
            raw = qp.getlist("assignee")[-1].strip()
            if raw.lower() in ("", "null", "none"):
                q.unassigned = True
            else:
                q.assignee = _int_param("assignee", raw)
        for name in ("created_at__gte", "created_at__lte"):
            if name in qp:
                raw = qp.getlist(name)[-1].strip()
                try:
                    dt = parse_ts(raw)
                except ValueError:
                    raise _invalid(name, "Enter a valid date/time (ISO 8601, e.g. 2025-01-31).") from None
                if name == "created_at__lte" and len(raw) == 10:
                    dt = dt + timedelta(days=1) - timedelta(microseconds=1)  # a date means the whole day
                if name == "created_at__gte":
                    q.created_gte = format_ts(dt)
                else:
                    q.created_lte = format_ts(dt)
        if "id__in" in qp:
            q.ids = [_int_param("id__in", v) for v in _csv(qp.getlist("id__in"))]
            if len(q.ids) > MAX_ID_IN:
                raise _invalid("id__in", f"Give at most {MAX_ID_IN} ids.")
        if "limit" in qp:
            q.limit = _int_param("limit", qp.getlist("limit")[-1], minimum=0)
        return q

    async def list_tasks(request: Request) -> Response:
        q = task_query(request)
        page, page_size = _page_params(request)
        offset = (page - 1) * page_size
        count, ids = st.store.task_page(q, offset, page_size)
        _check_page(count, page, page_size)
        fields, expand = _fields_expand(request)
        if fields == ["id"]:
            results: list = [{"id": i} for i in ids]
        else:
            ser = _Serializer(st, request)
            results = [ser.task(t, fields, expand) for t in st.store.tasks_by_ids(ids)]
        return JSONResponse(_paginated(request, count, page, page_size, results))

    async def get_task(request: Request) -> Response:
        task = st.store.get_task(request.path_params["id"])
        if task is None:
            raise _not_found()
        fields, expand = _fields_expand(request)
        return JSONResponse(_Serializer(st, request).task(task, fields, expand))

    async def patch_task(request: Request) -> Response:
        body = _require_object(await _json_body(request))
        errors = _unknown_keys(body, ("status", "assignee"))
        if "status" in body and (not isinstance(body["status"], str) or not body["status"].strip()):
            errors["status"] = ["Must be a non-empty string."]
        if "assignee" in body and body["assignee"] is not None and not _is_int(body["assignee"]):
            errors["assignee"] = ["Must be a user id or null."]
        if errors:
            raise ApiError(400, errors)
        task_id = request.path_params["id"]
        task = st.store.get_task(task_id)
        if task is None:
            raise _not_found()
        if "status" in body and (why := transition_error(task["status"], body["status"])):
            raise ApiError(400, {"status": [why]})
        if body.get("assignee") is not None and not any(
            u["id"] == body["assignee"] for u in st.store.list_users()
        ):
            raise ApiError(400, {"assignee": [f"User {body['assignee']} does not exist."]})
        st.store.update_task(task_id, **body)
        return JSONResponse(st.store.get_task(task_id))

    async def submit_task(request: Request) -> Response:
        """Move a task to the next workflow stage (Encord's `submit`)."""
        body = await _json_body(request) if await request.body() else {}
        errors = _unknown_keys(_require_object(body), ())
        if errors:
            raise ApiError(400, errors)
        task_id = request.path_params["id"]
        task = st.store.get_task(task_id)
        if task is None:
            raise _not_found()
        new = submitted_status(task["status"])
        if new is None:
            raise ApiError(400, {"status": [f"task {task_id} is already complete; there is no next stage"]})
        st.store.update_task(task_id, status=new)
        return JSONResponse(st.store.get_task(task_id))

    async def annotate_task(request: Request) -> Response:
        task_id = request.path_params["id"]
        body = _require_object(await _json_body(request))
        errors = _unknown_keys(body, ("action", "data"))
        action = body.get("action")
        if "action" not in body:
            errors["action"] = ["This field is required."]
        elif action not in ("submit", "save"):
            errors["action"] = [f'"{action}" is not a valid choice. Use "submit" or "save".']
        if "data" not in body:
            errors["data"] = ["This field is required."]
        elif not isinstance(body["data"], dict):
            errors["data"] = ["Expected a JSON object."]
        if errors:
            raise ApiError(400, errors)
        schema = request.query_params.get("schema")
        task = st.store.annotate_task(task_id, body["data"], action=action, schema=schema)
        if task is None:
            raise _not_found()
        return JSONResponse(task)

    async def get_data_unit(request: Request) -> Response:
        _, expand = _fields_expand(request)
        du = _Serializer(st, request).data_unit(request.path_params["id"], expand_files="files" in expand)
        if du is None:
            raise _not_found()
        return JSONResponse(du)

    # -- plugins, serve applications, agents --
    async def get_plugin_release(request: Request) -> Response:
        rel = st.store.get_plugin_release(request.path_params["id"])
        if rel is None:
            raise _not_found()
        return JSONResponse(rel)

    serve_params = frozenset(
        (
            "plugin_code",
            "job__agent",
            "agent",
            "plugin_release",
            "status",
            "name",
            "page",
            "page_size",
            *IGNORED_PARAMS,
        )
    )

    async def list_serve_applications(request: Request) -> Response:
        _only_params(request, serve_params)
        qp = request.query_params
        page, page_size = _page_params(request)
        agent = qp.get("job__agent") or qp.get("agent")
        agent_param = "job__agent" if "job__agent" in qp else "agent"
        count, rows = st.store.list_serve_applications(
            plugin_code=qp.get("plugin_code"),
            agent_id=None if agent is None else _int_param(agent_param, agent),
            plugin_release_id=None
            if "plugin_release" not in qp
            else _int_param("plugin_release", qp["plugin_release"]),
            status=qp.get("status"),
            name=qp.get("name"),
            offset=(page - 1) * page_size,
            limit=page_size,
        )
        return JSONResponse(_paginated(request, count, page, page_size, rows))

    async def get_serve_application(request: Request) -> Response:
        app_ = st.store.get_serve_application(request.path_params["id"])
        if app_ is None:
            raise _not_found()
        return JSONResponse(app_)

    agent_params = frozenset(("id", "page", "page_size", *IGNORED_PARAMS))

    async def list_agents(request: Request) -> Response:
        _only_params(request, agent_params)
        page, page_size = _page_params(request)
        qp = request.query_params
        agent_id = None if "id" not in qp else _int_param("id", qp["id"])
        count, rows = st.store.list_agents(agent_id=agent_id, offset=(page - 1) * page_size, limit=page_size)
        return JSONResponse(_paginated(request, count, page, page_size, rows))

    async def get_agent(request: Request) -> Response:
        agent = st.store.get_agent(request.path_params["id"])
        if agent is None:
            raise _not_found()
        return JSONResponse(agent)

    async def run_plugin(request: Request) -> Response:
        code = request.path_params["code"]
        body = _require_object(await _json_body(request))
        errors = _unknown_keys(body, RUN_KEYS)
        action = body.get("action")
        if "action" not in body:
            errors["action"] = ["This field is required."]
        elif action not in ("deployment", "inference"):
            errors["action"] = [f'"{action}" is not a valid choice. Use "deployment" or "inference".']
        params = body.get("params")
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            errors["params"] = ["Expected a JSON object."]
        agent: dict | None = None
        if body.get("agent") is not None:
            if not _is_int(body["agent"]):
                errors["agent"] = ["A valid integer is required."]
            else:
                agent = st.store.get_agent(body["agent"])
                if agent is None:
                    errors["agent"] = [f'Invalid pk "{body["agent"]}" - object does not exist.']
        for k in ("job_id", "storage_id"):
            if body.get(k) is not None and not _is_int(body[k]):
                errors[k] = ["A valid integer is required."]
        if (
            body.get("job_id") is not None
            and _is_int(body["job_id"])
            and st.store.get_job(body["job_id"]) is None
        ):
            errors["job_id"] = [f'Invalid pk "{body["job_id"]}" - object does not exist.']
        for k in ("version", "language"):
            if body.get(k) is not None and not isinstance(body[k], str):
                errors[k] = ["Not a valid string."]
        if "debug" in body and body["debug"] is not None and not isinstance(body["debug"], bool):
            errors["debug"] = ["Must be a valid boolean."]
        if errors:
            raise ApiError(400, errors)
        release = st.store.find_plugin_release(code, body.get("version"))
        if release is None:
            raise _not_found()
        runner = st.plugin_runner
        if runner is None:
            raise ApiError(503, {"detail": NO_RUNNER_DETAIL})
        full = {**body, "params": params, "language": body.get("language") or "ko"}
        if action == "inference":
            try:
                out = await runner.infer(release, full)
            except PluginRunError as exc:
                raise ApiError(exc.status_code, {"detail": exc.detail}) from None
            except Exception as exc:
                raise ApiError(502, {"detail": f"The plugin failed: {type(exc).__name__}"}) from None
            return JSONResponse(out)
        job_id = body.get("job_id")
        if job_id is None:
            job_id = st.store.create_job(
                "deployment", params, agent_id=None if agent is None else agent["id"]
            )
        try:
            result = await runner.deploy(release, params, agent, job_id)
        except PluginRunError as exc:
            st.store.update_job(job_id, status="FAILED", result={"error": exc.detail})
            raise ApiError(exc.status_code, {"detail": exc.detail, "job_id": job_id}) from None
        except Exception as exc:
            st.store.update_job(job_id, status="FAILED", result={"error": type(exc).__name__})
            raise ApiError(
                502, {"detail": f"The deployment failed: {type(exc).__name__}", "job_id": job_id}
            ) from None
        return JSONResponse({"job_id": job_id, **(result or {})})

    # -- jobs and logs --
    async def create_job(request: Request) -> Response:
        body = _require_object(await _json_body(request))
        errors = _unknown_keys(body, ("action", "params", "agent"))
        if not isinstance(body.get("action"), str) or not body["action"].strip():
            errors["action"] = ["This field is required."]
        if body.get("params") is not None and not isinstance(body["params"], dict):
            errors["params"] = ["Expected a JSON object."]
        if body.get("agent") is not None and not _is_int(body["agent"]):
            errors["agent"] = ["A valid integer is required."]
        if errors:
            raise ApiError(400, errors)
        job_id = st.store.create_job(body["action"], body.get("params") or {}, agent_id=body.get("agent"))
        return JSONResponse(st.store.get_job(job_id), status_code=201)

    async def get_job(request: Request) -> Response:
        job = st.store.get_job(request.path_params["id"])
        if job is None:
            raise _not_found()
        return JSONResponse(job)

    async def patch_job(request: Request) -> Response:
        body = _require_object(await _json_body(request))
        errors = _unknown_keys(body, JOB_PATCH_KEYS)
        if "status" in body and body["status"] not in JOB_STATUSES:
            errors["status"] = [
                f'"{body["status"]}" is not a valid choice. Use one of {", ".join(JOB_STATUSES)}.'
            ]
        for k in ("progress_record", "metrics_record"):
            if k in body and body[k] is not None and not isinstance(body[k], dict):
                errors[k] = ["Expected a JSON object."]
        if errors:
            raise ApiError(400, errors)
        job_id = request.path_params["id"]
        if not st.store.update_job(job_id, **body):
            raise _not_found()
        return JSONResponse(st.store.get_job(job_id))

    async def post_logs(request: Request) -> Response:
        body = await _json_body(request)
        items = body if isinstance(body, list) else [body]
        errors: list[dict] = []
        for item in items:
            err: dict[str, list[str]] = {}
            if not isinstance(item, dict):
                errors.append({"non_field_errors": ["Expected a JSON object."]})
                continue
            err.update(_unknown_keys(item, LOG_KEYS))
            if not isinstance(item.get("event"), str) or not item["event"]:
                err["event"] = ["This field is required."]
            job = item.get("job")
            if isinstance(job, str) and job.strip().isdigit():
                item["job"] = int(job)  # the SDK's JobLogger sends SYNAPSE_JOB_ID as a string
            elif job is not None and not _is_int(job):
                err["job"] = ["A valid integer is required."]
            for k in ("datetime", "step", "level"):
                if item.get(k) is not None and not isinstance(item[k], str):
                    err[k] = ["Not a valid string."]
            errors.append(err)
        if any(errors):
            raise ApiError(400, errors if isinstance(body, list) else errors[0])
        ids = st.store.add_logs(items)
        return JSONResponse([{"id": i, **item} for i, item in zip(ids, items, strict=True)], status_code=201)

    log_params = frozenset(("job", "page", "page_size", *IGNORED_PARAMS))

    async def list_logs(request: Request) -> Response:
        _only_params(request, log_params)
        page, page_size = _page_params(request)
        qp = request.query_params
        rows = st.store.logs(None if "job" not in qp else _int_param("job", qp["job"]))
        offset = _check_page(len(rows), page, page_size)
        return JSONResponse(
            _paginated(request, len(rows), page, page_size, rows[offset : offset + page_size])
        )

    # -- media --
    async def media(request: Request) -> Response:
        scope = request.scope
        rel: str = scope["path"][len("/media/") :]
        raw = scope.get("raw_path") or b""
        raw_l = raw.lower()
        if (
            not rel
            or any(bad in raw_l for bad in (b"%2e", b"%2f", b"%5c", b"%00"))
            or "\x00" in rel
            or "\\" in rel
            or rel.startswith("/")
            or any(seg in ("", ".", "..") for seg in rel.split("/"))
        ):
            raise _not_found()
        full = os.path.realpath(os.path.join(st.media_root, rel))
        if os.path.commonpath([full, st.media_root]) != st.media_root or full == st.media_root:
            raise _not_found()
        qp = request.query_params
        allowed = False
        if "signature" in qp or "expires" in qp:
            try:
                expires = int(qp.get("expires", ""))
            except ValueError:
                expires = -1
            sig = qp.get("signature", "")
            if expires < time.time():
                if st.header_token_ok(scope["headers"]):
                    allowed = True
                else:
                    raise ApiError(403, {"detail": "This signed URL has expired."})
            elif hmac.compare_digest(sig, st.sign(rel, expires)):
                allowed = True
        if not allowed and not st.header_token_ok(scope["headers"]):
            raise ApiError(
                403, {"detail": "Signature does not match; use the URL as given or send the token."}
            )
        if not os.path.isfile(full):
            raise _not_found()
        return FileResponse(full, media_type=_media_type(full))

    # -- /_local/ --
    async def seed(request: Request) -> Response:
        from .seed import DEMOS

        body = _require_object(await _json_body(request))
        demo = body.get("demo", "files")
        if demo not in DEMOS:
            raise _invalid("demo", f'"{demo}" is not a valid choice. Use one of {", ".join(DEMOS)}.')
        fn = DEMOS[demo]
        sig = inspect.signature(fn)
        accepted = [n for n in sig.parameters if n not in ("store", "media_dir")]
        kwargs = {k: v for k, v in body.items() if k != "demo"}
        errors = _unknown_keys(kwargs, tuple(accepted))
        tasks = kwargs.get("tasks", 10)
        if not _is_int(tasks) or not 0 <= tasks <= MAX_SEED_TASKS:
            errors["tasks"] = [f"Must be an integer from 0 to {MAX_SEED_TASKS}."]
        if "seed" in kwargs and not _is_int(kwargs["seed"]):
            errors["seed"] = ["A valid integer is required."]
        if errors:
            raise ApiError(400, errors)

        def work() -> dict:
            with Store(st.store.db_path) as s:
                return fn(s, st.media_dir, **kwargs)

        try:
            out = await asyncio.to_thread(work)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, {"detail": f"Cannot seed: {exc}"}) from None
        return JSONResponse(out, status_code=201)

    async def task_history(request: Request) -> Response:
        task_id = request.path_params["id"]
        if st.store.get_task(task_id) is None:
            raise _not_found()
        rows = st.store.history(task_id)
        return JSONResponse({"task": task_id, "count": len(rows), "results": rows})

    def _faults_view() -> dict:
        f = st.faults
        return {"faults": None if f is None else asdict(f.cfg), "stats": None if f is None else f.stats}

    async def get_faults(request: Request) -> Response:
        return JSONResponse(_faults_view())

    async def set_faults(request: Request) -> Response:
        st.faults = Faults(_parse_fault_config(await _json_body(request)))
        return JSONResponse(_faults_view())

    async def clear_faults(request: Request) -> Response:
        view = _faults_view()
        st.faults = None
        return JSONResponse(view)

    routes = [
        Route("/health/", health, methods=["GET"]),
        Route("/projects/{id:int}/", get_project, methods=["GET"]),
        Route("/data_collections/{id:int}/", get_data_collection, methods=["GET"]),
        Route("/sdk/tasks/", list_tasks, methods=["GET"]),
        Route("/tasks/{id:int}/", get_task, methods=["GET"]),
        Route("/tasks/{id:int}/", patch_task, methods=["PATCH"]),
        Route("/tasks/{id:int}/annotate_task_data/", annotate_task, methods=["PUT"]),
        Route("/tasks/{id:int}/submit/", submit_task, methods=["POST"]),
        Route("/data_units/{id:int}/", get_data_unit, methods=["GET"]),
        Route("/plugin_releases/{id:int}/", get_plugin_release, methods=["GET"]),
        Route("/serve_applications/", list_serve_applications, methods=["GET"]),
        Route("/serve_applications/{id:int}/", get_serve_application, methods=["GET"]),
        Route("/agents/", list_agents, methods=["GET"]),
        Route("/agents/{id:int}/", get_agent, methods=["GET"]),
        Route("/plugins/{code:str}/run/", run_plugin, methods=["POST"]),
        Route("/jobs/", create_job, methods=["POST"]),
        Route("/jobs/{id:int}/", get_job, methods=["GET"]),
        Route("/jobs/{id:int}/", patch_job, methods=["PATCH"]),
        Route("/logs/", post_logs, methods=["POST"]),
        Route("/logs/", list_logs, methods=["GET"]),
        Route("/media/{path:path}", media, methods=["GET"]),
        Route("/_local/seed/", seed, methods=["POST"]),
        Route("/_local/tasks/{id:int}/history/", task_history, methods=["GET"]),
    ]
    if fault_injection:
        routes += [
            Route("/_local/faults/", get_faults, methods=["GET"]),
            Route("/_local/faults/", set_faults, methods=["POST"]),
            Route("/_local/faults/", clear_faults, methods=["DELETE"]),
        ]

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            detail = f'Method "{request.method}" not allowed.'
        else:
            detail = _STATUS_DETAIL.get(exc.status_code, str(exc.detail))
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    async def on_error(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "Internal server error."}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        runner = st.plugin_runner
        if runner is not None and hasattr(runner, "attach"):
            runner.attach(st.store)
        try:
            yield
        finally:
            if runner is not None and hasattr(runner, "aclose"):
                with contextlib.suppress(Exception):
                    await runner.aclose()

    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error},
        lifespan=lifespan,
    )
    gated = _Gate(app, st)
    gated.state = st  # type: ignore[attr-defined]
    return gated


def _media_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    known = {".json": "application/json", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
    return known.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"
