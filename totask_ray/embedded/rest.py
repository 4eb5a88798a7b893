"""Request parsing, pagination and errors shared by every handler, so all endpoints answer alike.

The SDK clients were written against Django REST Framework, so the errors are DRF-shaped JSON
(`{"detail": ...}` or `{"field": ["message"]}`) and the pages DRF's `count/next/previous/results`.
Unknown query params and body fields are refused rather than ignored: a typo in a filter would
otherwise silently widen a task listing.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from starlette.requests import Request

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# `url_host` is sent by SDK clients built with one; the real backend reads it and moves on.
IGNORED_PARAMS = ("url_host",)
PAGE_PARAMS = ("page", "page_size", *IGNORED_PARAMS)

STATUS_DETAIL = {
    404: "Not found.",
    429: "Request was throttled.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service temporarily unavailable.",
    504: "Gateway timeout.",
}

_T = TypeVar("_T")
_INT = re.compile(r"\s*-?[0-9]{1,18}\s*")


class ApiError(Exception):
    """An error answer: `body` is the JSON to send (a DRF-style dict or list)."""

    def __init__(self, status_code: int, body: Any, headers: dict[str, str] | None = None):
        super().__init__(status_code)
        self.status_code = status_code
        self.body = body
        self.headers = headers


def invalid(field_name: str, message: str) -> ApiError:
    return ApiError(400, {field_name: [message]})


def not_found() -> ApiError:
    return ApiError(404, {"detail": "Not found."})


def found(value: _T | None) -> _T:
    """`value`, or a 404 when the store had no such row."""
    if value is None:
        raise not_found()
    return value


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise ApiError(400, {"detail": "JSON parse error - the request has no body."})
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, {"detail": f"JSON parse error - {exc}"}) from None


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(
            400,
            {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(body).__name__}."]},
        )
    return body


async def object_body(request: Request) -> dict:
    return require_object(await json_body(request))


def unknown_keys(body: dict, allowed: tuple[str, ...] | frozenset[str]) -> dict[str, list[str]]:
    return {k: [f"Unknown field. Allowed fields: {', '.join(allowed)}."] for k in body if k not in allowed}


def int_param(name: str, raw: str, *, minimum: int | None = None) -> int:
    if not isinstance(raw, str) or not _INT.fullmatch(raw):
        raise invalid(name, "A valid integer is required.")
    v = int(raw)
    if minimum is not None and v < minimum:
        raise invalid(name, f"Ensure this value is greater than or equal to {minimum}.")
    return v


def is_int(v: Any) -> bool:
    """True for a JSON integer; `bool` is an `int` in Python but `true` is no id."""
    return isinstance(v, int) and not isinstance(v, bool)


def csv(values: list[str]) -> list[str]:
    return [p.strip() for v in values for p in v.split(",") if p.strip()]


def page_params(request: Request) -> tuple[int, int]:
    qp = request.query_params
    page_size = DEFAULT_PAGE_SIZE
    if "page_size" in qp:
        page_size = min(int_param("page_size", qp["page_size"], minimum=1), MAX_PAGE_SIZE)
    page = 1
    if "page" in qp:
        try:
            page = int(qp["page"])
        except ValueError:
            raise ApiError(404, {"detail": "Invalid page."}) from None
        if page < 1:
            raise ApiError(404, {"detail": "Invalid page."})
    return page, page_size


def paginated(request: Request, count: int, page: int, page_size: int, results: list) -> dict:
    if page > 1 and (page - 1) * page_size >= count:
        raise ApiError(404, {"detail": "Invalid page."})
    nxt = str(request.url.include_query_params(page=page + 1)) if page * page_size < count else None
    prev = None
    if page > 1:
        url = request.url
        prev = str(url.remove_query_params("page") if page == 2 else url.include_query_params(page=page - 1))
    return {"count": count, "next": nxt, "previous": prev, "results": results}


def check_page(count: int, page: int, page_size: int) -> int:
    offset = (page - 1) * page_size
    if page > 1 and offset >= count:
        raise ApiError(404, {"detail": "Invalid page."})
    return offset


def only_params(request: Request, allowed: frozenset[str], what: str = "filter") -> None:
    unknown = [k for k in request.query_params if k not in allowed]
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ApiError(400, {k: [f"Unknown {what} '{k}'. Known: {known}."] for k in unknown})


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def fields_expand(request: Request) -> tuple[list[str] | None, set[str]]:
    qp = request.query_params
    fields = csv(qp.getlist("fields")) if "fields" in qp else None
    expand = set(csv(qp.getlist("expand")))
    return fields or None, expand
