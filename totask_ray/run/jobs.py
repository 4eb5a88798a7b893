"""The platform's job record and logs for a run, in the shapes the Synapse SDK's `JobLogger` sends.

A Synapse job page is drawn from what the SDK's ToTask action writes (`synapse_sdk.loggers.JobLogger`,
`plugins/actions/to_task/steps/annotate_task_data.py`, `plugins/entrypoint.py`), so a run on Ray
writes the same: a `progress_record` with the SDK's five steps and their proportions, a
`metrics_record` with the annotate step's counts, one `annotate_task_data` log event per task, and
a final PATCH with the status, the result and the progress record.

Neither the record nor the logs may stop the run: the tasks are the work, these only report on it.
A refused update or log batch is warned about and the run goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from totask_ray.params import Method
from totask_ray.platform.base import JobRecords
from totask_ray.platform.errors import PlatformError
from totask_ray.result import Metrics, RunStatus, ToTaskResult
from totask_ray.run.progress import STEP

log = logging.getLogger("totask_ray")

FINALIZE = "finalize"
# The SDK's steps with their `progress_proportion`; the inference ones add up to 105, and the
# overall figure is clamped to 100 as the SDK does.
STEP_PROPORTIONS: dict[Method, dict[str, int]] = {
    Method.FILE: {"initialize": 10, "prepare": 5, "fetch_tasks": 10, STEP: 70, FINALIZE: 5},
    Method.INFERENCE: {"initialize": 10, "prepare": 20, "fetch_tasks": 10, STEP: 60, FINALIZE: 5},
}
FAILURES_IN_RESULT = 100

LOG_BATCH_SIZE = 200  # the SDK's JOB_LOG_BATCH_SIZE
LOG_FLUSH_INTERVAL_S = 2.0  # the SDK's JOB_LOG_FLUSH_INTERVAL
LOG_QUEUE_MAX = 5_000
LOG_QUEUE_WAIT_S = 30.0
LOG_CLOSE_TIMEOUT_S = 30.0  # the SDK waits as long for its flusher


def iso_utc(ts: float | None = None) -> str:
    """`2026-01-02T03:04:05.123456+00:00`: what the SDK's `utcnow_iso()` writes."""
    return (datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)).isoformat()


class TaskEvent(NamedTuple):
    """One task's log event, kept as a tuple until it is sent: a full queue stays small."""

    task_id: int
    status: str  # the SDK's TaskProcessStatus: "success" | "failed"
    index: int
    total: int
    created: str
    error: str | None
    note: str | None  # ours, where "success" alone would hide what happened (skipped, unchanged)
    logged_at: str


class LogBatcher:
    """Sends log entries in batches of `batch_size`, or when the oldest has waited `interval_s`.

    A background thread sends, so the driver never waits on the platform for its logs. The queue
    is bounded: when the platform is slower than the run, `add` waits for room up to `wait_s` and
    then drops entries (counted) until a send gets through again, so a million tasks keep the
    driver's memory flat and a stalled platform cannot stall the run. A refused batch is dropped,
    not retried (the client already retried what may be retried, and a POST of logs is not
    idempotent: replaying one that reached the server would log its events twice).
    """

    def __init__(
        self,
        send: Callable[[list[TaskEvent]], None],
        *,
        batch_size: int = LOG_BATCH_SIZE,
        interval_s: float = LOG_FLUSH_INTERVAL_S,
        max_queued: int = LOG_QUEUE_MAX,
        wait_s: float = LOG_QUEUE_WAIT_S,
        on_error: Callable[[Exception, int], None] | None = None,
    ):
        self._send = send
        self.batch_size = max(1, batch_size)
        self.interval_s = interval_s
        self.max_queued = max(self.batch_size, max_queued)
        self.wait_s = wait_s
        self._on_error = on_error
        self._queue: deque[tuple[float, TaskEvent]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._gave_up_waiting = False
        self.added = 0
        self.sent = 0
        self.dropped = 0  # never sent: refused by the platform, or no room in the queue

    def add(self, event: TaskEvent) -> None:
        with self._cond:
            if self._closing:  # the step that logs is over; nothing after close is sent
                self.added += 1
                self.dropped += 1
                return
            if len(self._queue) >= self.max_queued and not self._gave_up_waiting:
                deadline = time.monotonic() + self.wait_s
                while len(self._queue) >= self.max_queued and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._gave_up_waiting = True
                        break
                    self._cond.wait(left)
            self.added += 1
            if len(self._queue) >= self.max_queued:
                self.dropped += 1
                return
            self._queue.append((time.monotonic(), event))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="totask-job-logs", daemon=True)
                self._thread.start()
            if len(self._queue) == 1 or len(self._queue) >= self.batch_size:
                self._cond.notify_all()  # the sender starts its 2 s clock, or sends a full batch

    def _next_batch(self) -> list[TaskEvent] | None:
        """Wait until a batch is due; None when closing and nothing is left."""
        with self._cond:
            while True:
                if self._queue and (
                    self._closing
                    or len(self._queue) >= self.batch_size
                    or time.monotonic() - self._queue[0][0] >= self.interval_s
                ):
                    n = min(self.batch_size, len(self._queue))
                    batch = [self._queue.popleft()[1] for _ in range(n)]
                    self._cond.notify_all()
                    return batch
                if self._closing:
                    return None
                timeout = (
                    None if not self._queue else self.interval_s - (time.monotonic() - self._queue[0][0])
                )
                self._cond.wait(timeout)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._send(batch)
            except Exception as exc:  # a bug in a send must not end the thread either: it only reports
                with self._cond:
                    self.dropped += len(batch)
                if self._on_error is not None:
                    self._on_error(exc, len(batch))
            else:
                with self._cond:
                    self.sent += len(batch)
                    self._gave_up_waiting = False

    def close(self, timeout_s: float = LOG_CLOSE_TIMEOUT_S) -> None:
        """Send what is queued and stop; idempotent. Waits at most `timeout_s` for the platform."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._cond:
            self._closed = True
            self.dropped += len(self._queue)  # left behind when the platform took too long
            self._queue.clear()


class JobSink:
    """The platform's job record and logs for this run; a failure to write them never stops the run."""

    def __init__(self, client: JobRecords, job_id: int, method: Method | str = Method.FILE):
        self.client = client
        self.job_id = job_id
        self.method = Method(method)
        self.proportions = STEP_PROPORTIONS[self.method]
        self._order = {name: i for i, name in enumerate(self.proportions)}
        self._annotate: dict[str, Any] = {}  # the annotate step's latest percent / time_remaining
        self._max_overall = 0.0
        self._started = time.monotonic()
        self._logs_warned = False
        self._logs_closed = False
        self.logs = LogBatcher(self._send_logs, on_error=self._log_error)

    # -- the record ---------------------------------------------------------------------------------

    def _patch(self, changes: dict[str, Any]) -> None:
        try:
            self.client.update_job(self.job_id, changes)
        except PlatformError as exc:
            log.warning("could not update job %d: %s", self.job_id, exc)

    def progress_record(self, current: str, *, final: bool = False) -> dict[str, Any]:
        """The SDK's `{"record": {"steps": …}, "current_progress": …}` with `current` the running step.

        Steps before `current` are done (100 %), later ones are not started (proportion and order
        only), as the SDK's record reads when the run is at `current`. `final` is the record of the
        last PATCH: like the SDK's `get_progress_record(time_elapsed=…)` after the steps ended, it
        carries `time_elapsed` and no `order`.
        """
        at = self._order[current]
        steps: dict[str, dict[str, Any]] = {}
        overall = 0.0
        for name, proportion in self.proportions.items():
            order = self._order[name]
            step: dict[str, Any] = {"proportion": proportion, "order": order}
            if order < at:
                step.update(percent=100.0, time_remaining=0.0)
                overall += proportion
            elif order == at:
                if name == STEP:
                    step.update(self._annotate or {"percent": 0.0, "time_remaining": None})
                elif name == FINALIZE:
                    step.update(percent=100.0, time_remaining=0.0)
                else:
                    step.update(percent=0.0, time_remaining=None)
                overall += proportion * step["percent"] / 100
            steps[name] = step
        self._max_overall = max(self._max_overall, overall)  # the SDK's never goes back
        now = steps[current]
        current_progress: dict[str, Any] = {
            "overall": round(min(self._max_overall, 100.0), 2),
            "step": current,
            "percent": now["percent"],
            "time_remaining": now["time_remaining"],
        }
        if final:
            current_progress["time_elapsed"] = int(time.monotonic() - self._started)
        else:
            current_progress["order"] = at
        return {"record": {"steps": steps}, "current_progress": current_progress}

    def start(self) -> None:
        self._started = time.monotonic()
        self._patch({"status": "RUNNING"})

    def progress(
        self,
        done: int,
        total: int,
        metrics: Metrics,
        workflow: dict[str, int] | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        """The annotate step's progress and counts, in one PATCH as the SDK coalesces them."""
        percent = round(100.0 * done / total, 2) if total > 0 else 100.0
        remaining = None
        if done > 0 and elapsed_s is not None:
            remaining = round(elapsed_s / done * max(total - done, 0), 2)
        elif total <= 0 or done >= total:
            remaining = 0.0
        self._annotate = {"percent": percent, "time_remaining": remaining}
        steps: dict[str, Any] = {
            STEP: {"success": metrics.success, "failed": metrics.failed, "stand_by": metrics.stand_by}
        }
        if workflow is not None:
            steps["workflow_action"] = workflow
        self._patch(
            {"progress_record": self.progress_record(STEP), "metrics_record": {"record": {"steps": steps}}}
        )

    def finish(self, result: ToTaskResult) -> None:
        """The final record: SUCCEEDED, FAILED or STOPPED, with the result and the progress record.

        The logs go first, so a job that reads as ended has all its events.
        """
        self.close_logs()
        body = result.model_dump(mode="json", exclude={"failures"})
        body["failures"] = [f.model_dump() for f in result.failures[:FAILURES_IN_RESULT]]
        # A stopped run never reached finalize: its record stays at the annotate step, where the
        # stop came (a stop before annotating reads as annotating 0 %).
        current = STEP if result.status is RunStatus.STOPPED else FINALIZE
        self._patch(
            {
                "status": result.status.value,
                "result": body,
                "progress_record": self.progress_record(current, final=True),
            }
        )

    def fail(self, step: str, message: str) -> None:
        self.close_logs()
        self._patch(
            {
                "status": "FAILED",
                "result": {"error": f"Step '{step}' failed: {message}"},
                "progress_record": self.progress_record(
                    step if step in self._order else "initialize", final=True
                ),
            }
        )

    # -- the logs -----------------------------------------------------------------------------------

    def task_event(
        self,
        task_id: int,
        status: str,
        index: int,
        total: int,
        *,
        error: str | None = None,
        note: str | None = None,
        finished_at: float = 0.0,
    ) -> None:
        """Queue the task's `annotate_task_data` event; it is sent in the next batch."""
        now = iso_utc()
        created = iso_utc(finished_at) if finished_at > 0 else now
        self.logs.add(TaskEvent(task_id, status, index, total, created, error, note, now))

    def entry(self, e: TaskEvent) -> dict[str, Any]:
        """The SDK's log entry for one task (`AnnotateTaskEvent.to_dict()` in a JobLogger entry)."""
        data: dict[str, Any] = {
            "task_info": {"task_id": e.task_id},
            "status": e.status,
            "method": self.method.value,
            "index": e.index,
            "total": e.total,
            "created": e.created,
            "error": e.error,
        }
        if e.note is not None:
            data["note"] = e.note
        return {
            "event": STEP,
            "data": data,
            "datetime": e.logged_at,
            "job": self.job_id,
            "step": STEP,
            "level": "info",
        }

    def _send_logs(self, batch: list[TaskEvent]) -> None:
        self.client.post_logs([self.entry(e) for e in batch])

    def _log_error(self, exc: Exception, n: int) -> None:
        if not self._logs_warned:
            self._logs_warned = True
            log.warning(
                "could not send %d log event(s) to job %d (the run goes on; later refusals are counted, "
                "not reported one by one): %s",
                n,
                self.job_id,
                exc,
            )

    def close_logs(self) -> None:
        """Send every queued event; idempotent, so the annotate step and the final record may both call it."""
        if self._logs_closed:
            return
        self._logs_closed = True
        self.logs.close()
        if self.logs.dropped:
            log.info(
                "%d of %d log event(s) did not reach job %d", self.logs.dropped, self.logs.added, self.job_id
            )
