"""The ASGI gate in front of the router: latency, token, tenant and injected faults.

It runs before routing, on raw ASGI, because these apply to every request alike and must answer
even where no route matches: a 401/403 or an injected fault carries `{"detail": ...}` and nothing
else, as the real backend's would. `/health/` passes untouched (probes send no token); `/media/`
checks its signature or token itself; `/_local/` is never faulted, so tests can always turn
faults off again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from .rest import STATUS_DETAIL
from .state import PlatformState

__all__ = ["Gate"]


async def _send_json(send: Callable, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _format_seconds(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


class Gate:
    """Outer ASGI middleware; see the module docstring."""

    def __init__(self, app: Any, state: PlatformState):
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
                    detail = f"Injected fault: {STATUS_DETAIL.get(status, 'error')}"
                    await _send_json(send, status, {"detail": detail}, extra)
                    return
                await asyncio.sleep(value)
        await self.app(scope, receive, send)
