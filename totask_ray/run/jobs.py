"""The platform's job record for a run: status, progress and metrics in the Synapse SDK's shapes.

A failure to update the record is logged and never stops the run: the tasks are the work, the
record only reports on it.
"""

from __future__ import annotations

import logging
from typing import Any

from totask_ray.platform.base import Platform
from totask_ray.platform.errors import PlatformError
from totask_ray.result import ToTaskResult
from totask_ray.run.progress import STEP

log = logging.getLogger("totask_ray")


class JobSink:
    """The platform's job record for this run; a failure to update it never stops the run."""

    def __init__(self, client: Platform, job_id: int):
        self.client = client
        self.job_id = job_id

    def _patch(self, changes: dict[str, Any]) -> None:
        try:
            self.client.update_job(self.job_id, changes)
        except PlatformError as exc:
            log.warning("could not update job %d: %s", self.job_id, exc)

    def start(self) -> None:
        self._patch({"status": "RUNNING"})

    def progress(self, done: int, total: int, metrics: Any, workflow: dict[str, int] | None = None) -> None:
        pct = round(100.0 * done / total, 1) if total else 100.0
        m = metrics.model_dump()
        steps: dict[str, Any] = {STEP: {k: m[k] for k in ("success", "failed", "stand_by")}}
        if workflow is not None:
            steps["workflow_action"] = workflow
        self._patch(
            {
                "progress_record": {STEP: {"current": done, "total": total, "percent": pct}},
                "metrics_record": {"record": {"steps": steps}},
            }
        )

    def finish(self, result: ToTaskResult) -> None:
        """The final record: SUCCEEDED, FAILED or STOPPED, with the result and the counts."""
        body = result.model_dump(mode="json", exclude={"failures"})
        body["failures"] = [f.model_dump() for f in result.failures[:100]]
        self._patch({"status": result.status.value, "result": body})

    def fail(self, step: str, message: str) -> None:
        self._patch({"status": "FAILED", "result": {"error": f"Step '{step}' failed: {message}"}})
