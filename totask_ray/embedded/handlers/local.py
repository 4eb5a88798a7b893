"""The `/_local/` test endpoints: seeding demos, a task's annotation history, fault injection.

None of them is part of the REST contract; they let tests and demos drive a running server over
HTTP. The gate never faults `/_local/`, and the fault routes exist only on a platform started with
`fault_injection`, so a normal server cannot be made to fail on purpose.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..faults import FaultConfig, Faults
from ..rest import ApiError, found, invalid, is_int, json_body, object_body, unknown_keys
from ..state import platform_of
from ..store import Store

MAX_SEED_TASKS = 1_000_000


async def seed(request: Request) -> Response:
    """Run a demo seeder by name; its keyword arguments are the accepted body fields."""
    from ..seeds import DEMOS

    st = platform_of(request)
    body = await object_body(request)
    demo = body.get("demo", "files")
    if demo not in DEMOS:
        raise invalid("demo", f'"{demo}" is not a valid choice. Use one of {", ".join(DEMOS)}.')
    fn = DEMOS[demo]
    sig = inspect.signature(fn)
    accepted = [n for n in sig.parameters if n not in ("store", "media_dir")]
    kwargs = {k: v for k, v in body.items() if k != "demo"}
    errors = unknown_keys(kwargs, tuple(accepted))
    tasks = kwargs.get("tasks", 10)
    if not is_int(tasks) or not 0 <= tasks <= MAX_SEED_TASKS:
        errors["tasks"] = [f"Must be an integer from 0 to {MAX_SEED_TASKS}."]
    if "seed" in kwargs and not is_int(kwargs["seed"]):
        errors["seed"] = ["A valid integer is required."]
    if errors:
        raise ApiError(400, errors)

    def work() -> dict:
        # On a worker thread with its own connection, so that a large demo holds neither the event
        # loop nor the app's store (and its lock) while it writes.
        with Store(st.store.db_path) as s:
            return fn(s, st.media_dir, **kwargs)

    try:
        out = await asyncio.to_thread(work)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, {"detail": f"Cannot seed: {exc}"}) from None
    return JSONResponse(out, status_code=201)


async def task_history(request: Request) -> Response:
    store = platform_of(request).store
    task_id = request.path_params["id"]
    found(store.get_task(task_id))
    rows = store.history(task_id)
    return JSONResponse({"task": task_id, "count": len(rows), "results": rows})


def parse_fault_config(body: Any) -> FaultConfig:
    """A `FaultConfig` from a request body, every bad field reported at once."""
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
    if body.get("max_in_a_row") is not None:
        n = body["max_in_a_row"]
        if not is_int(n) or n < 0:
            errors["max_in_a_row"] = ["Must be a whole number, 0 or more."]
        else:
            cfg.max_in_a_row = n
    if "seed" in body:
        if not is_int(body["seed"]):
            errors["seed"] = ["A valid integer is required."]
        else:
            cfg.seed = body["seed"]
    if errors:
        raise ApiError(400, errors)
    return cfg


def _faults_view(faults: Faults | None) -> dict:
    return {
        "faults": None if faults is None else asdict(faults.cfg),
        "stats": None if faults is None else faults.stats,
    }


async def get_faults(request: Request) -> Response:
    return JSONResponse(_faults_view(platform_of(request).faults))


async def set_faults(request: Request) -> Response:
    st = platform_of(request)
    st.faults = Faults(parse_fault_config(await json_body(request)))
    return JSONResponse(_faults_view(st.faults))


async def clear_faults(request: Request) -> Response:
    """Stop injecting; the answer is the last configuration with its counters."""
    st = platform_of(request)
    view = _faults_view(st.faults)
    st.faults = None
    return JSONResponse(view)
