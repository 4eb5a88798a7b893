"""The embedded platform's ASGI app: the Synapse REST contract over a `Store`, on Starlette.

This module assembles, and its route table shows the whole contract in one place: the endpoints
live in `handlers/` (one module per resource group), what every request goes through first in
`gate.py`, the parsing and DRF-shaped errors they share in `rest.py`, and the per-platform state in
`state.py`. Every endpoint is `async def` and its SQLite calls are short (see the throughput notes).

Beyond the contract, a few extensions live under `/_local/` (seeding, annotation history, fault
injection) plus `POST jobs/`, `GET logs/` and `PATCH tasks/{id}/`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .gate import Gate
from .handlers import data_units, jobs, local, plugins, projects, tasks
from .rest import STATUS_DETAIL, ApiError
from .state import PlatformState
from .store import Store


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the DRF shape the clients expect."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        detail = f'Method "{request.method}" not allowed.'
    else:
        detail = STATUS_DETAIL.get(exc.status_code, str(exc.detail))
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _on_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"detail": "Internal server error."}, status_code=500)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    """The runner's optional `attach(store)` and `aclose()` (see `runner.PluginRunner`)."""
    st: PlatformState = app.state.platform
    runner = st.plugin_runner
    if runner is not None and hasattr(runner, "attach"):
        runner.attach(st.store)
    try:
        yield
    finally:
        if runner is not None and hasattr(runner, "aclose"):
            with contextlib.suppress(Exception):
                await runner.aclose()


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
    st = PlatformState(store, Path(media_dir), token, tenant, latency_ms, fault_injection, plugin_runner)
    routes = [
        Route("/health/", health, methods=["GET"]),
        Route("/projects/{id:int}/", projects.get_project, methods=["GET"]),
        Route("/data_collections/{id:int}/", projects.get_data_collection, methods=["GET"]),
        Route("/sdk/tasks/", tasks.list_tasks, methods=["GET"]),
        Route("/tasks/{id:int}/", tasks.get_task, methods=["GET"]),
        Route("/tasks/{id:int}/", tasks.patch_task, methods=["PATCH"]),
        Route("/tasks/{id:int}/annotate_task_data/", tasks.annotate_task, methods=["PUT"]),
        Route("/tasks/{id:int}/submit/", tasks.submit_task, methods=["POST"]),
        Route("/data_units/{id:int}/", data_units.get_data_unit, methods=["GET"]),
        Route("/plugin_releases/{id:int}/", plugins.get_plugin_release, methods=["GET"]),
        Route("/serve_applications/", plugins.list_serve_applications, methods=["GET"]),
        Route("/serve_applications/{id:int}/", plugins.get_serve_application, methods=["GET"]),
        Route("/agents/", plugins.list_agents, methods=["GET"]),
        Route("/agents/{id:int}/", plugins.get_agent, methods=["GET"]),
        Route("/plugins/{code:str}/run/", plugins.run_plugin, methods=["POST"]),
        Route("/jobs/", jobs.create_job, methods=["POST"]),
        Route("/jobs/{id:int}/", jobs.get_job, methods=["GET"]),
        Route("/jobs/{id:int}/", jobs.patch_job, methods=["PATCH"]),
        Route("/logs/", jobs.post_logs, methods=["POST"]),
        Route("/logs/", jobs.list_logs, methods=["GET"]),
        Route("/media/{path:path}", data_units.media, methods=["GET"]),
        Route("/_local/seed/", local.seed, methods=["POST"]),
        Route("/_local/tasks/{id:int}/history/", local.task_history, methods=["GET"]),
    ]
    if fault_injection:  # otherwise `/_local/faults/` does not exist, and nothing can turn faults on
        routes += [
            Route("/_local/faults/", local.get_faults, methods=["GET"]),
            Route("/_local/faults/", local.set_faults, methods=["POST"]),
            Route("/_local/faults/", local.clear_faults, methods=["DELETE"]),
        ]
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_error},
        lifespan=_lifespan,
    )
    app.state.platform = st
    return Gate(app, st)
