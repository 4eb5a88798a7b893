"""Plugins: releases, serve applications, agents, and `plugins/{code}/run/`.

The platform itself runs nothing: `run` validates the call, then hands it to the platform's
`PluginRunner` (see `runner.py`), and answers 503 when none is attached so that a client learns
why instead of waiting on a job that never starts.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..rest import (
    PAGE_PARAMS,
    ApiError,
    found,
    int_param,
    is_int,
    object_body,
    only_params,
    page_params,
    paginated,
    unknown_keys,
)
from ..runner import NO_RUNNER_DETAIL, PluginRunError
from ..state import platform_of
from ..store import Store

RUN_KEYS = ("agent", "action", "params", "storage_id", "job_id", "debug", "version", "language")
_SERVE_PARAMS = frozenset(
    ("plugin_code", "job__agent", "agent", "plugin_release", "status", "name", *PAGE_PARAMS)
)
_AGENT_PARAMS = frozenset(("id", *PAGE_PARAMS))


async def get_plugin_release(request: Request) -> Response:
    return JSONResponse(found(platform_of(request).store.get_plugin_release(request.path_params["id"])))


async def list_serve_applications(request: Request) -> Response:
    only_params(request, _SERVE_PARAMS)
    qp = request.query_params
    page, page_size = page_params(request)
    agent = qp.get("job__agent") or qp.get("agent")
    agent_param = "job__agent" if "job__agent" in qp else "agent"
    count, rows = platform_of(request).store.list_serve_applications(
        plugin_code=qp.get("plugin_code"),
        agent_id=None if agent is None else int_param(agent_param, agent),
        plugin_release_id=None
        if "plugin_release" not in qp
        else int_param("plugin_release", qp["plugin_release"]),
        status=qp.get("status"),
        name=qp.get("name"),
        offset=(page - 1) * page_size,
        limit=page_size,
    )
    return JSONResponse(paginated(request, count, page, page_size, rows))


async def get_serve_application(request: Request) -> Response:
    return JSONResponse(found(platform_of(request).store.get_serve_application(request.path_params["id"])))


async def list_agents(request: Request) -> Response:
    only_params(request, _AGENT_PARAMS)
    page, page_size = page_params(request)
    qp = request.query_params
    agent_id = None if "id" not in qp else int_param("id", qp["id"])
    count, rows = platform_of(request).store.list_agents(
        agent_id=agent_id, offset=(page - 1) * page_size, limit=page_size
    )
    return JSONResponse(paginated(request, count, page, page_size, rows))


async def get_agent(request: Request) -> Response:
    return JSONResponse(found(platform_of(request).store.get_agent(request.path_params["id"])))


def _run_errors(store: Store, body: dict) -> tuple[dict[str, list[str]], dict | None]:
    """The field errors of a `run` body, and the agent it names (looked up while checking it)."""
    errors = unknown_keys(body, RUN_KEYS)
    action = body.get("action")
    if "action" not in body:
        errors["action"] = ["This field is required."]
    elif action not in ("deployment", "inference"):
        errors["action"] = [f'"{action}" is not a valid choice. Use "deployment" or "inference".']
    if body.get("params") is not None and not isinstance(body["params"], dict):
        errors["params"] = ["Expected a JSON object."]
    agent: dict | None = None
    if body.get("agent") is not None:
        if not is_int(body["agent"]):
            errors["agent"] = ["A valid integer is required."]
        else:
            agent = store.get_agent(body["agent"])
            if agent is None:
                errors["agent"] = [f'Invalid pk "{body["agent"]}" - object does not exist.']
    for k in ("job_id", "storage_id"):
        if body.get(k) is not None and not is_int(body[k]):
            errors[k] = ["A valid integer is required."]
    if body.get("job_id") is not None and is_int(body["job_id"]) and store.get_job(body["job_id"]) is None:
        errors["job_id"] = [f'Invalid pk "{body["job_id"]}" - object does not exist.']
    for k in ("version", "language"):
        if body.get(k) is not None and not isinstance(body[k], str):
            errors[k] = ["Not a valid string."]
    if "debug" in body and body["debug"] is not None and not isinstance(body["debug"], bool):
        errors["debug"] = ["Must be a valid boolean."]
    return errors, agent


async def run_plugin(request: Request) -> Response:
    st = platform_of(request)
    code = request.path_params["code"]
    body = await object_body(request)
    errors, agent = _run_errors(st.store, body)
    if errors:
        raise ApiError(400, errors)
    action = body["action"]
    params = {} if body.get("params") is None else body["params"]
    release = found(st.store.find_plugin_release(code, body.get("version")))
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
        job_id = st.store.create_job("deployment", params, agent_id=None if agent is None else agent["id"])
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
