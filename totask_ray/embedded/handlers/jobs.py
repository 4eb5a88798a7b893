"""Jobs and their logs: what a plugin run reports its progress and events to.

`POST jobs/` and `GET logs/` go beyond the REST contract: they let a runner or a test make a job to
report to, and read back what was logged.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..rest import (
    PAGE_PARAMS,
    ApiError,
    check_page,
    found,
    int_param,
    is_int,
    json_body,
    not_found,
    object_body,
    only_params,
    page_params,
    paginated,
    unknown_keys,
)
from ..state import platform_of
from ..store import JOB_STATUSES

JOB_PATCH_KEYS = ("status", "progress_record", "metrics_record", "result")
LOG_KEYS = ("event", "data", "datetime", "job", "step", "level")
_LOG_PARAMS = frozenset(("job", *PAGE_PARAMS))


async def create_job(request: Request) -> Response:
    store = platform_of(request).store
    body = await object_body(request)
    errors = unknown_keys(body, ("action", "params", "agent"))
    if not isinstance(body.get("action"), str) or not body["action"].strip():
        errors["action"] = ["This field is required."]
    if body.get("params") is not None and not isinstance(body["params"], dict):
        errors["params"] = ["Expected a JSON object."]
    if body.get("agent") is not None and not is_int(body["agent"]):
        errors["agent"] = ["A valid integer is required."]
    if errors:
        raise ApiError(400, errors)
    job_id = store.create_job(body["action"], body.get("params") or {}, agent_id=body.get("agent"))
    return JSONResponse(store.get_job(job_id), status_code=201)


async def get_job(request: Request) -> Response:
    return JSONResponse(found(platform_of(request).store.get_job(request.path_params["id"])))


async def patch_job(request: Request) -> Response:
    store = platform_of(request).store
    body = await object_body(request)
    errors = unknown_keys(body, JOB_PATCH_KEYS)
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
    if not store.update_job(job_id, **body):
        raise not_found()
    return JSONResponse(store.get_job(job_id))


def _log_errors(item: object) -> dict[str, list[str]]:
    """The field errors of one log entry; a string `job` is made an int in place (see below)."""
    if not isinstance(item, dict):
        return {"non_field_errors": ["Expected a JSON object."]}
    err = unknown_keys(item, LOG_KEYS)
    if not isinstance(item.get("event"), str) or not item["event"]:
        err["event"] = ["This field is required."]
    job = item.get("job")
    if isinstance(job, str) and job.strip().isdigit():
        item["job"] = int(job)  # the SDK's JobLogger sends SYNAPSE_JOB_ID as a string
    elif job is not None and not is_int(job):
        err["job"] = ["A valid integer is required."]
    for k in ("datetime", "step", "level"):
        if item.get(k) is not None and not isinstance(item[k], str):
            err[k] = ["Not a valid string."]
    return err


async def post_logs(request: Request) -> Response:
    """One entry or a list of them; errors come back in the same shape, one per entry."""
    body = await json_body(request)
    items = body if isinstance(body, list) else [body]
    errors = [_log_errors(item) for item in items]
    if any(errors):
        raise ApiError(400, errors if isinstance(body, list) else errors[0])
    ids = platform_of(request).store.add_logs(items)
    return JSONResponse([{"id": i, **item} for i, item in zip(ids, items, strict=True)], status_code=201)


async def list_logs(request: Request) -> Response:
    only_params(request, _LOG_PARAMS)
    page, page_size = page_params(request)
    qp = request.query_params
    rows = platform_of(request).store.logs(None if "job" not in qp else int_param("job", qp["job"]))
    offset = check_page(len(rows), page, page_size)
    return JSONResponse(paginated(request, len(rows), page, page_size, rows[offset : offset + page_size]))
