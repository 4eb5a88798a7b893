"""Tasks: the filtered listing a run pages through, one task, annotating it, and its workflow.

A run first pages through the ids of its tasks (`fields=id`), then reads each task; that id
listing answers from the id page alone, without loading a task row. It also takes DRF's
`ordering=id` / `-id` and django-filter's `id__gt`, `id__gte`, `id__lt`, `id__lte`, so a run can read
it by id ranges (keyset: each page resumes after the last id read) at the cost of one page at any
depth, where an offset page walks past every row before it.
"""

from __future__ import annotations

from datetime import timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..rest import (
    PAGE_PARAMS,
    ApiError,
    check_page,
    csv,
    fields_expand,
    found,
    int_param,
    invalid,
    is_int,
    json_body,
    object_body,
    only_params,
    page_params,
    paginated,
    require_object,
    unknown_keys,
)
from ..state import platform_of
from ..store import Store, TaskQuery, format_ts, parse_ts
from ..workflow import submitted_status, transition_error
from .data_units import Serializer

MAX_ID_IN = 10_000
TASK_FILTERS = (
    "project",
    "status",
    "status__in",
    "data_collection",
    "assignee",
    "created_at__gte",
    "created_at__lte",
    "id__in",
    "id__gt",
    "id__gte",
    "id__lt",
    "id__lte",
    "limit",
)
ORDERINGS = ("id", "-id")
_TASK_LIST_PARAMS = frozenset((*TASK_FILTERS, "ordering", "fields", "expand", *PAGE_PARAMS))


def task_query(request: Request, store: Store) -> TaskQuery:
    qp = request.query_params
    only_params(request, _TASK_LIST_PARAMS)
    if not qp.get("project", "").strip():
        raise invalid("project", "This field is required.")
    q = TaskQuery(project=int_param("project", qp["project"]))
    if store.get_project(q.project) is None:
        raise invalid("project", f"Select a valid choice. Project {q.project} does not exist.")
    if "status" in qp:
        q.statuses = [qp.getlist("status")[-1]]
    if "status__in" in qp:
        q.status_in = csv(qp.getlist("status__in"))
    if "data_collection" in qp:
        q.data_collection = int_param("data_collection", qp.getlist("data_collection")[-1])
        if store.get_data_collection(q.data_collection) is None:
            raise invalid(
                "data_collection",
                f"Select a valid choice. Data collection {q.data_collection} does not exist.",
            )
    if "assignee" in qp:
        raw = qp.getlist("assignee")[-1].strip()
        if raw.lower() in ("", "null", "none"):
            q.unassigned = True
        else:
            q.assignee = int_param("assignee", raw)
    for name in ("created_at__gte", "created_at__lte"):
        if name in qp:
            raw = qp.getlist(name)[-1].strip()
            try:
                dt = parse_ts(raw)
            except ValueError:
                raise invalid(name, "Enter a valid date/time (ISO 8601, e.g. 2025-01-31).") from None
            if name == "created_at__lte" and len(raw) == 10:
                dt = dt + timedelta(days=1) - timedelta(microseconds=1)  # a date means the whole day
            if name == "created_at__gte":
                q.created_gte = format_ts(dt)
            else:
                q.created_lte = format_ts(dt)
    if "id__in" in qp:
        q.ids = [int_param("id__in", v) for v in csv(qp.getlist("id__in"))]
        if len(q.ids) > MAX_ID_IN:
            raise invalid("id__in", f"Give at most {MAX_ID_IN} ids.")
    for name in ("id__gt", "id__gte", "id__lt", "id__lte"):
        if name in qp:
            setattr(q, name, int_param(name, qp.getlist(name)[-1].strip()))
    if "ordering" in qp:
        ordering = qp.getlist("ordering")[-1].strip()
        if ordering not in ORDERINGS:
            raise invalid("ordering", f"Order by one of: {', '.join(ORDERINGS)}.")
        q.descending = ordering == "-id"
    if "limit" in qp:
        q.limit = int_param("limit", qp.getlist("limit")[-1], minimum=0)
    return q


async def list_tasks(request: Request) -> Response:
    st = platform_of(request)
    q = task_query(request, st.store)
    page, page_size = page_params(request)
    offset = (page - 1) * page_size
    count, ids = st.store.task_page(q, offset, page_size)
    check_page(count, page, page_size)
    fields, expand = fields_expand(request)
    if fields == ["id"]:
        results: list = [{"id": i} for i in ids]
    else:
        ser = Serializer(st, request)
        results = [ser.task(t, fields, expand) for t in st.store.tasks_by_ids(ids)]
    return JSONResponse(paginated(request, count, page, page_size, results))


async def get_task(request: Request) -> Response:
    st = platform_of(request)
    task = found(st.store.get_task(request.path_params["id"]))
    fields, expand = fields_expand(request)
    return JSONResponse(Serializer(st, request).task(task, fields, expand))


async def patch_task(request: Request) -> Response:
    store = platform_of(request).store
    body = await object_body(request)
    errors = unknown_keys(body, ("status", "assignee"))
    if "status" in body and (not isinstance(body["status"], str) or not body["status"].strip()):
        errors["status"] = ["Must be a non-empty string."]
    if "assignee" in body and body["assignee"] is not None and not is_int(body["assignee"]):
        errors["assignee"] = ["Must be a user id or null."]
    if errors:
        raise ApiError(400, errors)
    task_id = request.path_params["id"]
    task = found(store.get_task(task_id))
    if "status" in body and (why := transition_error(task["status"], body["status"])):
        raise ApiError(400, {"status": [why]})
    if body.get("assignee") is not None and not any(u["id"] == body["assignee"] for u in store.list_users()):
        raise ApiError(400, {"assignee": [f"User {body['assignee']} does not exist."]})
    store.update_task(task_id, **body)
    return JSONResponse(store.get_task(task_id))


async def submit_task(request: Request) -> Response:
    """Move a task to the next workflow stage (Encord's `submit`); the body may be empty."""
    store = platform_of(request).store
    body = await json_body(request) if await request.body() else {}
    errors = unknown_keys(require_object(body), ())
    if errors:
        raise ApiError(400, errors)
    task_id = request.path_params["id"]
    task = found(store.get_task(task_id))
    new = submitted_status(task["status"])
    if new is None:
        raise ApiError(400, {"status": [f"task {task_id} is already complete; there is no next stage"]})
    store.update_task(task_id, status=new)
    return JSONResponse(store.get_task(task_id))


async def annotate_task(request: Request) -> Response:
    store = platform_of(request).store
    task_id = request.path_params["id"]
    body = await object_body(request)
    errors = unknown_keys(body, ("action", "data"))
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
    return JSONResponse(found(store.annotate_task(task_id, body["data"], action=action, schema=schema)))
