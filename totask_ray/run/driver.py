"""`run_to_task`: the one documented entry point of a run (the CLI, `ray job submit` and notebooks
all come through here).

The driver is the only place that knows the order of the steps (`run/steps.py`) and picks the
method for the params. A critical error stops the run at once, rolls back the executed steps in
reverse (each releases what it acquired: a pre-processor this run started is torn down), marks the
job record FAILED and raises `ToTaskError` with the user guide's message. Task-level failures never
stop the run.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Literal

from totask_ray.action import ToTask
from totask_ray.errors import CriticalError, RunStopped, ToTaskError
from totask_ray.methods.base import AnnotationMethod
from totask_ray.methods.file import FileMethod
from totask_ray.methods.inference import InferenceMethod, InferenceOptions
from totask_ray.net.downloads import DEFAULT_MAX_JSON_BYTES
from totask_ray.net.images import MAX_IMAGE_BYTES
from totask_ray.params import Method, ToTaskParams
from totask_ray.platform.connect import PlatformConfig, config_from_env, connect, for_job
from totask_ray.platform.errors import PlatformError
from totask_ray.result import RunStatus, ToTaskResult
from totask_ray.run.context import RunContext, RunOptions
from totask_ray.run.jobs import JobSink
from totask_ray.run.steps import Step, result, steps

log = logging.getLogger("totask_ray")


def method_for(params: ToTaskParams, options: RunOptions) -> AnnotationMethod:
    """The method the params ask for, set up with the run's options."""
    if params.method is Method.INFERENCE:
        return InferenceMethod(
            InferenceOptions(
                ray_address=options.ray_address,
                serve_poll_interval_s=options.serve_poll_interval_s,
                serve_ready_timeout_s=options.serve_ready_timeout_s,
                call_timeout_s=options.inference_call_timeout_s,
                convention=options.inference_convention,
                decode_actor_cpus=options.actor_cpus,
                verbose_ray=options.verbose_ray,
            )
        )
    return FileMethod()


def run_to_task(
    params: ToTaskParams | dict[str, Any],
    platform: PlatformConfig | None = None,
    action_cls: type[ToTask] = ToTask,
    *,
    report: Path | str | None = None,
    job_id: int | None = None,
    create_job: bool = False,
    dry_run: bool = False,
    resume: Path | str | None = None,
    ray_address: str | None = None,
    num_actors: int | None = None,
    actor_cpus: float = 0.5,
    concurrency: int = 32,
    hook_threads: int = 8,
    progress_bar: bool | None = None,
    no_progress_timeout_s: float = 300.0,
    allowed_hosts: list[str] | None = None,
    allow_private_urls: bool = False,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    download_timeout_s: float = 30.0,
    page_size: int = 500,
    verbose_ray: bool = False,
    stop_timeout_s: float = 30.0,
    serve_poll_interval_s: float = 10.0,
    serve_ready_timeout_s: float = 180.0,
    inference_call_timeout_s: float = 120.0,
    inference_convention: Literal["batched", "synapse"] | None = None,
) -> ToTaskResult:
    """Run the ToTask action over a Ray cluster and return its result.

    `params` are the Synapse ToTask parameters (a dict or `ToTaskParams`); `platform` where the
    platform is (default: the SYNAPSE_* environment variables); `action_cls` your `ToTask`
    subclass, whose hooks convert the data.

    How to run (each checked by `RunOptions`):
      report: write one JSON line per task outcome to this path.
      job_id / create_job: report status, progress, metrics and the result to this platform job
        record / to a new one.
      dry_run: do everything except writing; the report holds what would have been written.
      resume: skip the tasks that succeeded (or were skipped) in this earlier report.
      ray_address: the Ray cluster (default: an initialised Ray, RAY_ADDRESS, else a fresh local one).
      num_actors: annotator actors (default: as many as the free CPUs hold, at most 16, grown from one).
      actor_cpus: CPUs each annotator actor reserves.
      concurrency: tasks in flight per actor; hook_threads: threads for hooks that are plain functions.
      progress_bar: show a bar (default: when stderr is a terminal or a notebook).
      no_progress_timeout_s: fail the run when no task finishes for this long.
      allowed_hosts / allow_private_urls: private hosts file URLs may point at, besides the
        platform's own (default: none).
      max_json_bytes / max_image_bytes / download_timeout_s: limits of one file download.
      page_size: task ids per listing page.
      verbose_ray: Ray's own logs and Ray Data's progress.
      stop_timeout_s: on SIGINT or SIGTERM (`ray job stop`, Ctrl-C, a notebook's interrupt), how long
        the tasks in flight may take to finish and report before the run stops anyway.
      serve_poll_interval_s / serve_ready_timeout_s / inference_call_timeout_s: the inference
        method's waits for the pre-processor to come up and for each batch call.
      inference_convention: `batched` (the app's predict(images, params), one call per batch) or
        `synapse` (the app's own POST / request, one per task, merged by its @serve.batch);
        default: as the release says.

    Raises `ToTaskError` on a critical error (after rollback; `.result` holds what was done),
    `RunStopped` (a `KeyboardInterrupt`) when a signal stopped the run (the job record is STOPPED,
    the report closed, `.result` counts every write), and `ParamsError` on bad params or options.
    """
    from totask_ray.params import ParamsError

    params = ToTaskParams.parse(params)
    try:
        opts = RunOptions(
            report=report, job_id=job_id, create_job=create_job, dry_run=dry_run, resume=resume,
            ray_address=ray_address, num_actors=num_actors, actor_cpus=actor_cpus, concurrency=concurrency,
            hook_threads=hook_threads, progress_bar=progress_bar, no_progress_timeout_s=no_progress_timeout_s,
            allowed_hosts=list(allowed_hosts or []), allow_private_urls=allow_private_urls,
            max_json_bytes=max_json_bytes, max_image_bytes=max_image_bytes,
            download_timeout_s=download_timeout_s, page_size=page_size, verbose_ray=verbose_ray, stop_timeout_s=stop_timeout_s,
            serve_poll_interval_s=serve_poll_interval_s, serve_ready_timeout_s=serve_ready_timeout_s,
            inference_call_timeout_s=inference_call_timeout_s, inference_convention=inference_convention,
        )  # fmt: skip
    except ValueError as exc:
        errors = exc.errors(include_url=False, include_input=False) if hasattr(exc, "errors") else []
        raise ParamsError([(".".join(str(p) for p in e["loc"]), e["msg"]) for e in errors]) from None
    config = for_job(platform or config_from_env(), params.name, params.project)
    client = connect(config)
    ctx = RunContext(
        params=params,
        options=opts,
        config=config,
        action_cls=action_cls,
        client=client,
        method=method_for(params, opts),
    )
    executed: list[Step] = []
    current: Step | None = None
    try:
        if opts.job_id is not None:
            ctx.job = JobSink(client, opts.job_id, params.method)
        elif opts.create_job:
            job = client.create_job(
                {"action": ToTask.action_name, "params": params.to_synapse(), "agent": params.agent}
            )
            ctx.job = JobSink(client, job.id, params.method)
        if ctx.job is not None:
            ctx.job.start()
        for step in steps():
            current = step
            step.run(ctx)
            executed.append(step)
        outcome = result(ctx)
        if ctx.job is not None:
            ctx.job.finish(outcome)
        log.info("%s", outcome.message)
        return outcome
    except (CriticalError, PlatformError) as exc:
        message = str(exc)
        step_name = current.name if current is not None else "initialize"
        for step in reversed([*executed, *([current] if current is not None else [])]):
            with contextlib.suppress(Exception):
                step.rollback(ctx)
        failed = result(ctx, RunStatus.FAILED, message)
        if ctx.job is not None:
            ctx.job.fail(step_name, message)
        log.error("Step '%s' failed: %s", step_name, message)
        raise ToTaskError(message, failed) from exc
    except KeyboardInterrupt as exc:  # RunStopped from the annotate step, or a Ctrl-C before it
        message = str(exc) if isinstance(exc, RunStopped) else "Stopped by SIGINT before annotating"
        stopped = result(ctx, RunStatus.STOPPED, message)
        if ctx.job is not None:
            ctx.job.finish(stopped)
        log.warning("%s", stopped.message)
        raise RunStopped(stopped.message, stopped) from None
    finally:
        for cleanup in reversed(ctx.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        client.close()
