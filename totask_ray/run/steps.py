"""The steps of a run, in order: initialize, prepare, fetch_tasks, annotate; then the result.

Each step reads and fills the `RunContext`; a step that cannot go on raises `CriticalError`, and
the driver then calls `rollback` on every step that ran, in reverse, so each releases what it
acquired. The method's own check (and its undo) is the `prepare` step; everything else is the same
for every method.
"""

from __future__ import annotations

import logging
import time
from array import array
from dataclasses import replace
from typing import Any

import numpy as np

from totask_ray.cluster import ensure_ray
from totask_ray.errors import CriticalError, RunStopped
from totask_ray.ledger.record import close_sink
from totask_ray.ledger.store import ledger_root, start_run
from totask_ray.methods.base import PrepareInput
from totask_ray.net.object_store import describe
from totask_ray.pipeline.outcomes import COUNTS, DONE_STATUSES, from_columns, totals
from totask_ray.pipeline.run import PipelineSpec, free_cpus, run_pipeline, wait_for_cpus
from totask_ray.platform.connect import connect
from totask_ray.platform.errors import NotFoundError, PlatformError, PlatformFilterError
from totask_ray.result import RunStatus, ToTaskResult
from totask_ray.run.context import RunContext
from totask_ray.run.progress import STEP, RunTracker
from totask_ray.run.report_store import (
    Location,
    open_report,
    read_records,
    report_exists,
)
from totask_ray.run.stop import GracefulStop

log = logging.getLogger("totask_ray")


class Step:
    name = "step"

    def run(self, ctx: RunContext) -> None:  # pragma: no cover - per step
        raise NotImplementedError

    def rollback(self, ctx: RunContext) -> None:
        """Release what this step acquired. Default: nothing."""


class Initialize(Step):
    """The project and its data collection exist and this token sees them."""

    name = "initialize"

    def run(self, ctx: RunContext) -> None:
        pid = ctx.spec.params.project
        # The run's first call: a platform that is not there (or a refused token) is a setting to fix,
        # not a blip, so it is retried twice at most and the run fails in seconds, before any Ray.
        probe = connect(ctx.spec.platform.model_copy(update={"retries": min(ctx.spec.platform.retries, 2)}))
        try:
            ctx.project = probe.get_project(pid)
        except NotFoundError:
            raise CriticalError(
                f"Project not found: project {pid} does not exist or this token cannot see it"
            ) from None
        finally:
            probe.close()
        if ctx.spec.params.on_success is not None and not ctx.client.supports_workflow:
            raise CriticalError(
                "on_success cannot be applied: this platform has no task workflow (status, assignee, "
                "submit); leave on_success out of the job"
            )
        if ctx.project.data_collection is None:
            raise CriticalError(
                f"Project has no data collection: link a data collection to project {pid} before running"
            )
        try:
            ctx.collection = ctx.client.get_data_collection(ctx.project.data_collection)
        except NotFoundError:
            raise CriticalError(
                f"Project has no data collection: data collection {ctx.project.data_collection} was not found"
            ) from None


def count_tasks(ctx: RunContext) -> None:
    """How many tasks the filters select, refusing filters the platform cannot apply and a job
    with nothing to do."""
    p = ctx.spec.params
    try:
        ctx.total = ctx.client.count_tasks(p.project, p.task_filters)
    except PlatformFilterError as exc:
        raise CriticalError(f"The task filters cannot be used: {exc}") from exc
    except PlatformError as exc:
        if getattr(exc, "status_code", None) == 400:
            raise CriticalError(f"The platform refused the task filters: {exc}") from exc
        raise
    if ctx.total == 0:
        raise CriticalError("No tasks found matching filters: check task_filters and that the tasks exist")


class Prepare(Step):
    """The method's own check before any task is read (file: the specification; inference: the
    params and labels, then the pre-processor is up); its rollback is the method's.

    The tasks are counted first (the SDK's step order is kept; fetch_tasks reuses the count): a
    filter the platform cannot apply, or no task to do, is refused before a pre-processor is
    deployed, not after it was started and torn down."""

    name = "prepare"

    def run(self, ctx: RunContext) -> None:
        assert ctx.project is not None and ctx.collection is not None
        count_tasks(ctx)
        ctx.cleanups.append(ctx.method.close)  # at the end of any run, once prepare has begun
        ctx.method.prepare(PrepareInput(ctx.spec.params, ctx.client, ctx.project, ctx.collection))

    def rollback(self, ctx: RunContext) -> None:
        ctx.method.rollback()


class FetchTasks(Step):
    """How many tasks match, and which an earlier report already finished."""

    name = "fetch_tasks"

    def run(self, ctx: RunContext) -> None:
        if not ctx.total:  # counted at prepare; a step list without it counts here
            count_tasks(ctx)
        resume = ctx.spec.options.resume
        if resume is not None and ctx.spec.options.resume_if_exists and not report_exists(resume):
            log.info("no report at %s yet: starting from the first task", describe(resume))
        elif resume is not None:
            ctx.exclude = done_in_report(resume)
            log.info(
                "resuming: %d task(s) already done in %s are skipped", len(ctx.exclude), describe(resume)
            )


class Annotate(Step):
    """The pipeline: every task through the method's annotator, outcomes recorded as they come.

    A first SIGINT/SIGTERM stops new tasks and keeps recording until what was in flight has
    reported (`run/stop.py`); then `RunStopped` ends the run, with every write in the counts.
    """

    name = STEP

    def run(self, ctx: RunContext) -> None:
        o = ctx.spec.options
        ensure_ray(o.ray_address, verbose=o.verbose_ray)
        total = ctx.total - (len(ctx.exclude) if ctx.exclude is not None else 0)
        if o.report is not None:
            ctx.report_file = open_report(o.report, carry_from=o.resume)
            ctx.cleanups.append(ctx.report_file.close)
        if not o.dry_run and not o.no_ledger:  # the run's ledger, before any actor writes
            release = getattr(getattr(ctx.method, "plan", None), "app_name", None)
            # beside the report, on disk or on its object store (`ledger/place.py`)
            ledger = start_run(ledger_root(o.ledger, o.report), ctx.spec.params, ctx.spec.platform, release)
            ctx.spec = replace(ctx.spec, ledger=ledger)
            ctx.cleanups.append(lambda: close_sink(ledger))
            where = describe(ledger.path)
            log.info("run %s: ledger %s (undo: totask-ray undo %s)", ledger.run_id, where, where)
        ctx.tracker = RunTracker(
            max(total, 0),
            report=ctx.report_file,
            job_sink=ctx.job,
            show_bar=o.progress_bar,
            workflow=ctx.spec.params.on_success is not None,
        )
        critical = None
        free_before = free_cpus()
        with GracefulStop(o.stop_timeout_s) as stop:
            try:
                for batch in run_pipeline(pipeline_spec(ctx, stop.flag)):
                    for outcome in from_columns(batch):
                        ctx.tracker.record(outcome)
                        if outcome.critical and critical is None:
                            critical = outcome.error
                    ctx.tracker.flush()
                    if critical is not None:
                        break
            except KeyboardInterrupt:
                stop.cut = True  # a second signal, the bound, or an interrupt before any handler
                stop.reason = stop.reason or "SIGINT"
            finally:
                ctx.tracker.close()
        if not stop.cut and not wait_for_cpus(free_before):
            log.debug("the annotator actors had not all given their CPUs back yet")
        if stop.reason is not None:
            waited = time.monotonic() - (stop.signalled_at or time.monotonic())
            how = "before what was in flight had reported" if stop.cut else f"{waited:.1f} s after it"
            raise RunStopped(f"Stopped by {stop.reason} {how}")
        if critical is not None:
            raise CriticalError(f"The run stopped: {critical}")


def steps() -> list[Step]:
    return [Initialize(), Prepare(), FetchTasks(), Annotate()]


def pipeline_spec(ctx: RunContext, stop_flag: Any = None) -> PipelineSpec:
    return PipelineSpec(
        run=ctx.spec,
        annotator=ctx.method.annotator(ctx.spec, stop_flag),
        total=ctx.total,
        exclude=ctx.exclude,
        stop_flag=stop_flag,
        lister=ctx.client,
    )


def done_in_report(path: Location) -> np.ndarray:
    """The ids an earlier report finished, sorted and unique, 8 bytes each (a Python set of them
    was about 60 bytes an id on the driver: 30 MB at 500k done)."""
    if not report_exists(path):
        raise CriticalError(f"Resume report not found: {describe(path)}")
    done = array("q", (r["task_id"] for r in read_records(path) if r.get("status") in DONE_STATUSES))
    return np.unique(np.frombuffer(done, dtype=np.int64))


def against_projected(elapsed_s: float, projected_s: float, done: int) -> str:
    """What the run achieved against what `preview` projected (`--projected-s`), with its own task
    rate; the stage that bound the run is named just before (`StageClock.describe`), the one the
    preview expected on its page."""
    off = (elapsed_s - projected_s) / projected_s * 100
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"achieved {elapsed_s:.1f} s ({rate:.1f} tasks/s overall) against {projected_s:.1f} s projected "
        f"by preview ({off:+.0f} %)"
    )


def result(ctx: RunContext, status: RunStatus | None = None, message: str | None = None) -> ToTaskResult:
    """The run's result from what the tracker counted (finalize)."""
    t = ctx.tracker
    if t is None:
        return ToTaskResult(status=status or RunStatus.FAILED, message=message or "", total_tasks=ctx.total)
    metrics = t.metrics()
    n = totals(t.counts, "result")
    if status is None:
        status = RunStatus.FAILED if metrics.failed and not metrics.success else RunStatus.SUCCEEDED
    empty = f" ({n['empty_count']} with no object)" if n["empty_count"] else ""
    counts = f"{n['success_count']} succeeded{empty}, {n['failed_count']} failed"
    for s, c in COUNTS.items():
        if c.summary is not None and t.counts[s]:
            counts += ", " + c.summary.format(n=t.counts[s])
    if metrics.stand_by:
        counts += f", {metrics.stand_by} not processed"
    if t.workflow:
        counts += f"; on_success applied to {t.workflow_applied}, refused for {t.workflow_failed}"
    if t.failures_dropped:
        counts += f"; the first {len(t.failures)} failures are listed, all are in the report"
    if message is None:
        message = f"Annotated {n['success_count']} of {metrics.total} tasks: {counts}"
    else:
        message = f"{message} ({counts})"
    elapsed = time.monotonic() - ctx.started
    bound = t.stages.describe()
    if bound:
        message += "; " + bound
    if ctx.spec.options.projected_s is not None:
        message += "; " + against_projected(elapsed, ctx.spec.options.projected_s, t.done)
    return ToTaskResult(
        status=status,
        message=message,
        total_tasks=metrics.total,
        **n,
        workflow_applied_count=t.workflow_applied,
        workflow_failed_count=t.workflow_failed,
        call_retries=t.call_retries,
        call_backoffs=t.call_backoffs,
        failures=list(t.failures),
        metrics=metrics,
        elapsed_s=round(elapsed, 3),
        stage_seconds=t.stages.seconds(),
        bound_by=t.stages.bound(),
        run_id=ctx.spec.ledger.run_id if ctx.spec.ledger is not None else None,
        ledger=ctx.spec.ledger.path if ctx.spec.ledger is not None else None,
    )
