"""Live progress, metrics, failure lines, the per-task report and the platform's job record and logs.

Everything here is fed one outcome at a time by the driver, so it reflects the run as it happens;
nothing keeps more than counters and a bounded failure list (the job's log events go to the sink's
bounded queue), so a run over a million tasks keeps the driver's memory flat.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from typing import IO, Any, Protocol

from totask_ray.pipeline.outcomes import COUNTS, STAGE_TIMES, Outcome, Status, totals
from totask_ray.result import Metrics, TaskFailure

log = logging.getLogger("totask_ray")

STEP = "annotate_task_data"
MAX_FAILURES_KEPT = 10_000


def _interactive() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]

        if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
            return True
    except Exception:
        pass
    return sys.stderr.isatty()


class IdSet:
    """Seen task ids in a bitmap (1 bit per id over the id range), falling back to a set when sparse."""

    MAX_SPAN = 1 << 30

    def __init__(self) -> None:
        self._base: int | None = None
        self._bits = bytearray()
        self._fallback: set[int] | None = None

    def add(self, tid: int) -> bool:
        """Record `tid`; False when it was already there."""
        if self._fallback is not None:
            if tid in self._fallback:
                return False
            self._fallback.add(tid)
            return True
        if self._base is None:
            self._base = max(0, tid - 1024)
        off = tid - self._base
        if off < 0 or off >= self.MAX_SPAN:
            self._fallback = set(self._iter()) | {tid}
            self._bits = bytearray()
            return True
        byte, bit = divmod(off, 8)
        if byte >= len(self._bits):
            self._bits.extend(b"\0" * max(byte + 1 - len(self._bits), len(self._bits)))
        if self._bits[byte] & (1 << bit):
            return False
        self._bits[byte] |= 1 << bit
        return True

    def _iter(self):
        assert self._base is not None
        for i, b in enumerate(self._bits):
            if b:
                for bit in range(8):
                    if b & (1 << bit):
                        yield self._base + i * 8 + bit


class StageClock:
    """Where the run's tasks spent their time, summed over their outcomes per stage (`STAGE_TIMES`:
    read, convert, model, write), and the stage that bound the run: the one the tasks spent most of
    their time in. Tasks run concurrently up to a bound, so the stage they wait on longest is where
    the run's queue is: a slow platform write shows as write, a busy model as model. Four additions
    a task on the driver."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(STAGE_TIMES, 0.0)

    def add(self, o: Outcome) -> None:
        for stage, name in STAGE_TIMES.items():
            self.ms[stage] += getattr(o, name)

    def seconds(self) -> dict[str, float]:
        return {k: round(v / 1000, 3) for k, v in self.ms.items()}

    def bound(self) -> str | None:
        """The stage with the largest share of the tasks' time; None before any task reported one."""
        total = sum(self.ms.values())
        return max(self.ms, key=lambda k: self.ms[k]) if total > 0 else None

    def describe(self) -> str:
        """`bound by write (71 % of the tasks' time: read 12 %, convert 17 %, write 71 %)`; '' without times."""
        bound, total = self.bound(), sum(self.ms.values())
        if bound is None:
            return ""
        shares = ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in self.ms.items() if v > 0)
        return f"bound by {bound} ({100 * self.ms[bound] / total:.0f} % of the tasks' time: {shares})"


class EventSink(Protocol):
    """Where the tracker sends per-task events and progress: the job record (`run/jobs.JobSink`),
    which imports this module for the step's name, so the tracker names only what it calls."""

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
    ) -> None: ...

    def progress(
        self,
        done: int,
        total: int,
        metrics: Metrics,
        workflow: dict[str, int] | None = None,
        elapsed_s: float | None = None,
    ) -> None: ...

    def close_logs(self) -> None: ...


class RunTracker:
    """Counts, progress lines, a progress bar, failure lines, the report file and job records."""

    def __init__(
        self,
        total: int,
        *,
        report: IO[str] | None = None,
        job_sink: EventSink | None = None,
        show_bar: bool | None = None,
        log_every_s: float = 10.0,
        job_every_s: float = 2.0,
        workflow: bool = False,
    ):
        self.total = total
        self.counts: Counter[Status] = Counter()  # per status; what each counts as: `COUNTS`
        self.workflow = workflow
        self.workflow_applied = 0
        self.workflow_failed = 0
        self.call_retries = 0  # issue 25: pre-processor calls sent again (outcomes' retries, backoffs)
        self.call_backoffs = 0
        self.duplicates = 0
        self.stages = StageClock()
        self.failures: list[TaskFailure] = []
        self.failures_dropped = 0
        self._seen = IdSet()
        self._report = report
        self._job = job_sink
        self._log_every = log_every_s
        self._job_every = job_every_s
        self._last_log = 0.0
        self._last_pct_logged = -1.0
        self._last_job = 0.0
        self._bar = None
        self._redirect: Any = None
        self._started = time.monotonic()
        if show_bar if show_bar is not None else _interactive():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="annotate", unit="task", dynamic_ncols=True)
            # Log lines and the bar share stderr: log through the bar, so it stays whole at the bottom.
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()  # the root logger, where the CLI logs
            self._redirect.__enter__()

    @property
    def done(self) -> int:
        return self.counts.total()

    def metrics(self) -> Metrics:
        return Metrics(
            total=max(self.total, self.done),
            stand_by=max(0, self.total - self.done),
            **totals(self.counts, "metrics"),
        )

    def record(self, o: Outcome) -> None:
        counts = COUNTS[o.status]
        if not counts.metrics:
            return  # never started: stand_by, left for a resume, not in the report
        if not self._seen.add(o.task_id):
            self.duplicates += 1
            return
        self.counts[o.status] += 1
        self.call_retries += o.retries
        self.call_backoffs += o.backoffs
        self.stages.add(o)
        if counts.workflow:
            if o.workflow_error:
                self.workflow_failed += 1
                log.warning("[Task %d] Workflow action failed: %s", o.task_id, o.workflow_error)
            elif self.workflow and o.workflow_applied:
                self.workflow_applied += 1
        if counts.event == "failed":
            log.warning("[Task %d] Failed: %s", o.task_id, o.error)
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append(TaskFailure(task_id=o.task_id, error=o.error))
            else:
                self.failures_dropped += 1
        if self._report is not None:
            self._report.write(o.to_json() + "\n")
        if self._job is not None:
            self._log_event(o)
        if self._bar is not None:
            self._bar.update(1)
        self._maybe_report()

    def _log_event(self, o: Outcome) -> None:
        """The task's `annotate_task_data` event, numbered in the order outcomes came in, as the SDK does."""
        assert self._job is not None
        counts = COUNTS[o.status]
        failed = counts.event == "failed"
        note = counts.note
        self._job.task_event(
            o.task_id,
            counts.event,
            self.done,
            max(self.total, self.done),
            error=(o.error or "failed") if failed else None,
            note=None if note is None else note.format(error=o.error or "the task already holds data"),
            finished_at=o.finished_at,
        )

    def flush(self) -> None:
        if self._report is not None:
            self._report.flush()

    def _maybe_report(self, force: bool = False) -> None:
        now = time.monotonic()
        total = max(self.total, self.done)
        pct = 100.0 * self.done / total if total else 100.0
        if (
            force
            or pct >= 100.0
            or pct - self._last_pct_logged >= 25.0
            or now - self._last_log >= self._log_every
        ):
            if pct != self._last_pct_logged:
                log.info("[%s] Progress: %.1f%% (%d/%d)", STEP, pct, self.done, total)
                self._last_pct_logged = pct
            self._last_log = now
        if self._job is not None and (force or now - self._last_job >= self._job_every):
            self._last_job = now
            workflow = (
                {"success": self.workflow_applied, "failed": self.workflow_failed} if self.workflow else None
            )
            self._job.progress(self.done, total, self.metrics(), workflow, elapsed_s=now - self._started)

    def close(self) -> None:
        """The last progress and counts, and every queued log event sent: the annotate step is over."""
        self._maybe_report(force=True)
        if self._job is not None:
            self._job.close_logs()
        self.flush()
        if self._bar is not None:
            self._bar.close()
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None
