"""The plugin-runner contract: what `POST plugins/{code}/run/` hands its work to.

It lives apart from the web app so that a runner (`ray_runner.py`, or a test's fake) depends on
this contract alone, not on Starlette and the handlers; the app loads runners by name at startup.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["NO_RUNNER_DETAIL", "PluginRunError", "PluginRunner"]

# The `detail` of the 503 that `plugins/{code}/run/` answers when the platform has no runner.
NO_RUNNER_DETAIL = "No Ray cluster is attached to this platform; start it with one to run plugins."


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
