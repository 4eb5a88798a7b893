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
from typing import Any

from totask_ray.action import ToTask
from totask_ray.errors import CriticalError, RunStopped, ToTaskError
from totask_ray.methods.base import AnnotationMethod
from totask_ray.methods.file import FileMethod
from totask_ray.methods.inference import InferenceMethod
from totask_ray.params import Method, ToTaskParams
from totask_ray.pipeline.spec import RunOptions, RunSpec, documented_options
from totask_ray.platform.base import job_records
from totask_ray.platform.connect import PlatformConfig, auth_hint, config_from_env, connect
from totask_ray.platform.errors import AuthenticationError, PlatformError
from totask_ray.result import RunStatus, ToTaskResult
from totask_ray.run.context import RunContext
from totask_ray.run.jobs import JobSink
from totask_ray.run.steps import Step, result, steps

log = logging.getLogger("totask_ray")


def method_for(spec: RunSpec) -> AnnotationMethod:
    """The method the params ask for."""
    return InferenceMethod(spec) if spec.params.method is Method.INFERENCE else FileMethod()


def run_to_task(
    params: ToTaskParams | dict[str, Any],
    platform: PlatformConfig | None = None,
    action_cls: type[ToTask] = ToTask,
    *,
    options: RunOptions | None = None,
    **overrides: Any,
) -> ToTaskResult:
    """Run the ToTask action over a Ray cluster and return its result.

    `params` are the Synapse ToTask parameters (a dict or `ToTaskParams`); `platform` where the
    platform is (default: the SYNAPSE_* environment variables); `action_cls` your `ToTask`
    subclass, whose hooks convert the data.

    How to run: `options` (a `RunOptions`), and any of its fields as a keyword, which overrides
    it (`run_to_task(params, report="r.jsonl", num_actors=4)`). Each is checked before anything
    runs. The options, with their defaults:
    {options}

    Raises `ToTaskError` on a critical error (after rollback; `.result` holds what was done),
    `RunStopped` (a `KeyboardInterrupt`) when a signal stopped the run (the job record is STOPPED,
    the report closed, `.result` counts every write), and `ParamsError` on bad params or options.
    """
    from totask_ray.params import ParamsError

    params = ToTaskParams.parse(params)
    try:
        base = {} if options is None else options.model_dump(exclude_unset=True)
        opts = RunOptions.model_validate({**base, **overrides})
    except ValueError as exc:
        errors = exc.errors(include_url=False, include_input=False) if hasattr(exc, "errors") else []
        raise ParamsError([(".".join(str(p) for p in e["loc"]), e["msg"]) for e in errors]) from None
    # the config a run uses (Label Studio: `model_version` defaults to the job's name)
    config = (platform or config_from_env()).for_job(params.name, params.project)
    spec = RunSpec(params=params, options=opts, platform=config, action_cls=action_cls)
    log.info("%s", spec.url_policy.describe())
    client = connect(config)
    ctx = RunContext(spec=spec, client=client, method=method_for(spec))
    executed: list[Step] = []
    current: Step | None = None
    try:
        if opts.job_id is not None:
            ctx.job = JobSink(job_records(client), opts.job_id, params.method)
        elif opts.create_job:
            records = job_records(client)
            job = records.create_job(
                {"action": ToTask.action_name, "params": params.to_synapse(), "agent": params.agent}
            )
            ctx.job = JobSink(records, job.id, params.method)
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
        if isinstance(exc, AuthenticationError):
            message = f"{message} ({auth_hint(config)})"
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


# The options model's field descriptions are the documentation: `help(run_to_task)` lists them all.
run_to_task.__doc__ = (run_to_task.__doc__ or "").replace("    {options}", documented_options())
