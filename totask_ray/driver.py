"""The driver: the only place that knows the order of the steps.

initialize (project → data collection) · prepare (file: the target specification; inference: the
pre-processor lifecycle) · fetch_tasks (count, stream) · annotate (Ray Data) · finalize.

A critical error stops the run at once, rolls back the executed steps in reverse (each releases
what it acquired: the job record is marked FAILED, a pre-processor this run started is torn down)
and raises `ToTaskError` with the user guide's message. Task-level failures never stop the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from totask_ray.action import ToTask
from totask_ray.net.downloads import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_JSON_BYTES, UrlPolicy
from totask_ray.params import Method, RunStatus, ToTaskParams, ToTaskResult
from totask_ray.pipeline.outcomes import Status, from_columns, read_report
from totask_ray.platform.errors import NotFoundError, PlatformError
from totask_ray.platform.models import DataCollection, Project
from totask_ray.platform.synapse.client import SynapseClient, SynapseConfig
from totask_ray.progress import STEP, RunTracker

log = logging.getLogger("totask_ray")


class ToTaskError(RuntimeError):
    """A critical error: the run stopped. `result` holds what was done before it stopped."""

    def __init__(self, message: str, result: ToTaskResult | None = None):
        super().__init__(message)
        self.result = result


class CriticalError(RuntimeError):
    """Raised inside a step; the driver rolls back and re-raises it as `ToTaskError`."""


class RunOptions(BaseModel):
    """How to run (not what to do: that is `ToTaskParams`)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    report: Path | None = None
    job_id: int | None = None
    create_job: bool = False
    dry_run: bool = False
    resume: Path | None = None
    ray_address: str | None = None
    num_actors: int | None = Field(default=None, ge=1)
    actor_cpus: float = Field(default=0.5, gt=0)
    concurrency: int = Field(default=32, ge=1, le=1024)
    hook_threads: int = Field(default=8, ge=1)
    progress_bar: bool | None = None
    no_progress_timeout_s: float = Field(default=300.0, gt=0)
    actor_start_timeout_s: int = Field(default=120, gt=0)
    allowed_hosts: list[str] = Field(default_factory=list)
    allow_private_urls: bool = False
    max_json_bytes: int = Field(default=DEFAULT_MAX_JSON_BYTES, gt=0)
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, gt=0)
    download_timeout_s: float = Field(default=30.0, gt=0)
    page_size: int = Field(default=500, ge=1, le=1000)
    verbose_ray: bool = False
    # inference
    serve_poll_interval_s: float = Field(default=10.0, gt=0)
    serve_ready_timeout_s: float = Field(default=180.0, gt=0)
    inference_call_timeout_s: float = Field(default=120.0, gt=0)


@dataclass
class RunContext:
    params: ToTaskParams
    options: RunOptions
    config: SynapseConfig
    action_cls: type[ToTask]
    client: SynapseClient
    project: Project | None = None
    collection: DataCollection | None = None
    total: int = 0
    exclude: np.ndarray | None = None
    job: JobSink | None = None
    tracker: RunTracker | None = None
    report_file: IO[str] | None = None
    inference: Any = None  # set by the inference prepare step
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class JobSink:
    """The platform's job record for this run; a failure to update it never stops the run."""

    def __init__(self, client: SynapseClient, job_id: int):
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
        body = result.model_dump(mode="json", exclude={"failures"})
        body["failures"] = [f.model_dump() for f in result.failures[:100]]
        self._patch({"status": result.status.value, "result": body})

    def fail(self, step: str, message: str) -> None:
        self._patch({"status": "FAILED", "result": {"error": f"Step '{step}' failed: {message}"}})


# -- steps -------------------------------------------------------------------------------------


class Step:
    name = "step"

    def run(self, ctx: RunContext) -> None:  # pragma: no cover - per step
        raise NotImplementedError

    def rollback(self, ctx: RunContext) -> None:
        """Release what this step acquired. Default: nothing."""


class Initialize(Step):
    name = "initialize"

    def run(self, ctx: RunContext) -> None:
        pid = ctx.params.project
        try:
            ctx.project = ctx.client.get_project(pid)
        except NotFoundError:
            raise CriticalError(
                f"Project not found: project {pid} does not exist or this token cannot see it"
            ) from None
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


class PrepareFile(Step):
    name = "prepare"

    def run(self, ctx: RunContext) -> None:
        assert ctx.collection is not None
        spec = ctx.params.target_specification_name
        names = ctx.collection.specification_names
        if spec not in names:
            known = ", ".join(repr(n) for n in names) or "none"
            raise CriticalError(
                f"Target specification not found: '{spec}' is not a file specification of the project's "
                f"data collection (it has {known})"
            )


class FetchTasks(Step):
    name = "fetch_tasks"

    def run(self, ctx: RunContext) -> None:
        p = ctx.params
        try:
            ctx.total = ctx.client.count_tasks(p.project, p.task_filters)
        except PlatformError as exc:
            if getattr(exc, "status_code", None) == 400:
                raise CriticalError(f"The platform refused the task filters: {exc}") from exc
            raise
        if ctx.total == 0:
            raise CriticalError(
                "No tasks found matching filters: check task_filters and that the tasks exist"
            )
        if ctx.options.resume is not None:
            ctx.exclude = _done_in_report(ctx.options.resume)
            log.info(
                "resuming: %d task(s) already done in %s are skipped", len(ctx.exclude), ctx.options.resume
            )


class Annotate(Step):
    name = STEP

    def run(self, ctx: RunContext) -> None:
        from totask_ray.pipeline.run import run_pipeline

        ensure_ray(ctx.options.ray_address, verbose=ctx.options.verbose_ray)

        total = ctx.total - (len(ctx.exclude) if ctx.exclude is not None else 0)
        if ctx.options.report is not None:
            ctx.options.report.parent.mkdir(parents=True, exist_ok=True)
            ctx.report_file = open(ctx.options.report, "w", encoding="utf-8")  # noqa: SIM115 - closed in finalize
            ctx.cleanups.append(ctx.report_file.close)
        ctx.tracker = RunTracker(
            max(total, 0),
            report=ctx.report_file,
            job_sink=ctx.job,
            show_bar=ctx.options.progress_bar,
            workflow=ctx.params.on_success is not None,
        )
        critical = None
        try:
            for batch in run_pipeline(ctx):
                for outcome in from_columns(batch):
                    ctx.tracker.record(outcome)
                    if outcome.critical and critical is None:
                        critical = outcome.error
                ctx.tracker.flush()
                if critical is not None:
                    break
        finally:
            ctx.tracker.close()
        if critical is not None:
            raise CriticalError(f"The run stopped: {critical}")


def _done_in_report(path: Path) -> np.ndarray:
    if not path.exists():
        raise CriticalError(f"Resume report not found: {path}")
    done = {
        r["task_id"] for r in read_report(str(path)) if r.get("status") in (Status.SUCCESS, Status.SKIPPED)
    }
    return np.array(sorted(done), dtype=np.int64)


# -- the run -------------------------------------------------------------------------------------


def _steps(params: ToTaskParams) -> list[Step]:
    if params.method is Method.INFERENCE:
        from totask_ray.inference import PrepareInference

        prepare: Step = PrepareInference()
    else:
        prepare = PrepareFile()
    return [Initialize(), prepare, FetchTasks(), Annotate()]


def _result(ctx: RunContext, status: RunStatus | None = None, message: str | None = None) -> ToTaskResult:
    t = ctx.tracker
    if t is None:
        return ToTaskResult(status=status or RunStatus.FAILED, message=message or "", total_tasks=ctx.total)
    metrics = t.metrics()
    if status is None:
        status = RunStatus.FAILED if t.failed and not (t.success or t.skipped) else RunStatus.SUCCEEDED
    counts = f"{t.success} succeeded, {t.failed} failed"
    if t.skipped:
        counts += f", {t.skipped} skipped"
    if metrics.stand_by:
        counts += f", {metrics.stand_by} not processed"
    if t.workflow:
        counts += f"; on_success applied to {t.workflow_applied}, refused for {t.workflow_failed}"
    if t.failures_dropped:
        counts += f"; the first {len(t.failures)} failures are listed, all are in the report"
    if message is None:
        message = f"Annotated {t.success} of {metrics.total} tasks: {counts}"
    else:
        message = f"{message} ({counts})"
    return ToTaskResult(
        status=status,
        message=message,
        total_tasks=metrics.total,
        success_count=t.success,
        failed_count=t.failed,
        skipped_count=t.skipped,
        workflow_applied_count=t.workflow_applied,
        workflow_failed_count=t.workflow_failed,
        failures=list(t.failures),
        metrics=metrics,
        elapsed_s=round(time.monotonic() - ctx.started, 3),
    )


def ensure_ray(address: str | None = None, *, verbose: bool = False) -> bool:
    """Connect to a cluster (address or RAY_ADDRESS) or start a local one; True if we started it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "configure_logging": verbose}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, **kwargs)
        return False
    # "local": start a fresh cluster; a bare ray.init() would attach to whatever `ray start` left running.
    ray.init(address="local", include_dashboard=False, **kwargs)
    return True


def run_to_task(
    params: ToTaskParams | dict[str, Any],
    platform: SynapseConfig | None = None,
    action_cls: type[ToTask] = ToTask,
    **options: Any,
) -> ToTaskResult:
    """Run the ToTask action over a Ray cluster and return its result.

    Raises `ToTaskError` on a critical error (after rollback) and `ParamsError` on bad params.
    """
    params = ToTaskParams.parse(params)
    opts = RunOptions(**options)
    config = platform or SynapseConfig.from_env()
    client = SynapseClient(config)
    ctx = RunContext(params=params, options=opts, config=config, action_cls=action_cls, client=client)
    executed: list[Step] = []
    current: Step | None = None
    try:
        if opts.job_id is not None:
            ctx.job = JobSink(client, opts.job_id)
        elif opts.create_job:
            job = client.create_job(
                {"action": ToTask.action_name, "params": params.to_synapse(), "agent": params.agent}
            )
            ctx.job = JobSink(client, job.id)
        if ctx.job is not None:
            ctx.job.start()
        for step in _steps(params):
            current = step
            step.run(ctx)
            executed.append(step)
        result = _result(ctx)
        if ctx.job is not None:
            ctx.job.finish(result)
        log.info("%s", result.message)
        return result
    except (CriticalError, PlatformError) as exc:
        message = str(exc)
        step_name = current.name if current is not None else "initialize"
        for step in reversed([*executed, *([current] if current is not None else [])]):
            with contextlib.suppress(Exception):
                step.rollback(ctx)
        result = _result(ctx, RunStatus.FAILED, message)
        if ctx.job is not None:
            ctx.job.fail(step_name, message)
        log.error("Step '%s' failed: %s", step_name, message)
        raise ToTaskError(message, result) from exc
    finally:
        for cleanup in reversed(ctx.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        client.close()


def worker_settings(ctx: RunContext) -> Any:
    from totask_ray.pipeline.workers import WorkerSettings

    o = ctx.options
    return WorkerSettings(
        platform=ctx.config,
        params=ctx.params,
        action_cls=ctx.action_cls,
        url_policy=UrlPolicy.for_platform(ctx.config.host, o.allowed_hosts, o.allow_private_urls),
        concurrency=o.concurrency,
        hook_threads=o.hook_threads,
        dry_run=o.dry_run,
        max_json_bytes=o.max_json_bytes,
        max_image_bytes=o.max_image_bytes,
        download_timeout_s=o.download_timeout_s,
    )
