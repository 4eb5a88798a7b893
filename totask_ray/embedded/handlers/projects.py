"""Projects and data collections, read-only: a run only looks them up; seeding makes them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..rest import fields_expand, found
from ..state import platform_of


async def get_project(request: Request) -> Response:
    return JSONResponse(found(platform_of(request).store.get_project(request.path_params["id"])))


async def get_data_collection(request: Request) -> Response:
    store = platform_of(request).store
    dc = found(store.get_data_collection(request.path_params["id"]))
    specs = store.file_specifications(dc["id"])
    _, expand = fields_expand(request)
    dc["file_specifications"] = specs if "file_specifications" in expand else [s["id"] for s in specs]
    return JSONResponse(dc)
