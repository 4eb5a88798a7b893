"""`totask-ray`: run, demo, platform, serve.

Exit codes of `run`: 0 every task succeeded, 2 some tasks failed, 1 the run failed (bad params,
a critical error, or every task failed). Messages go to stderr without tokens or stack traces.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from totask_ray.embedded.cli import platform_app
from totask_ray.result import EXIT_FAILED, EXIT_STOPPED
from totask_ray.serving.cli import serve_app

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

app = typer.Typer(
    name="totask-ray",
    help="Pre-annotate labeling tasks at cluster scale (Synapse or Label Studio, on Ray Data and Ray Serve).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(platform_app, name="platform", help="The embedded Synapse-compatible platform.")
app.add_typer(serve_app, name="serve", help="Pre-processors on Ray Serve: deploy, status, delete.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_action_class(spec: str | None) -> type:
    """`package.module:Class` (or `package.module.Class`) of a ToTask subclass."""
    from totask_ray.action import ToTask

    if not spec:
        return ToTask
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise typer.BadParameter(f"cannot import {spec}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, ToTask)):
        raise typer.BadParameter(f"{spec} is not a subclass of totask_ray.ToTask")
    return cls


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="Job parameters, YAML or JSON (Synapse ToTask names).")],
    platform: Annotated[
        str | None,
        typer.Option(
            help="synapse or label-studio (default: label-studio when $LABEL_STUDIO_URL and "
            "$LABEL_STUDIO_API_KEY are set and $SYNAPSE_HOST is not, else synapse)."
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Platform URL (default: $SYNAPSE_HOST or $LABEL_STUDIO_URL).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="Access token (prefer $SYNAPSE_ACCESS_TOKEN or $LABEL_STUDIO_API_KEY)."),
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(help="Label Studio: the predictions' model_version (default: the job's name)."),
    ] = None,
    write: Annotated[
        str, typer.Option(help="Label Studio: write predictions (default) or annotations.")
    ] = "predictions",
    release: Annotated[
        list[str] | None,
        typer.Option(help="Label Studio: a pre-processor release, ID=path/to/config.yaml (repeatable)."),
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant (default: $SYNAPSE_PLUGIN_RUN_TENANT).")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else local).")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write one JSON line per task outcome here.")] = None,
    job_id: Annotated[
        int | None, typer.Option(help="Platform job id to report progress and result to.")
    ] = None,
    plugin: Annotated[
        str | None, typer.Option(help="Your ToTask subclass, e.g. plugin.to_task:ToTask.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Do everything except writing; the report shows what would be written.")
    ] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Skip tasks that succeeded in this earlier report.")
    ] = None,
    num_actors: Annotated[int | None, typer.Option(help="Annotator actors (default: one per CPU).")] = None,
    concurrency: Annotated[int, typer.Option(help="Tasks in flight per actor.")] = 32,
    allow_host: Annotated[
        list[str] | None, typer.Option(help="Extra host allowed for file URLs (repeatable).")
    ] = None,
    stop_timeout: Annotated[
        float, typer.Option(help="On Ctrl-C/SIGTERM, seconds the tasks in flight may take to finish.")
    ] = 30.0,
    verbose: Annotated[bool, typer.Option(help="Debug logs and Ray Data's own progress.")] = False,
) -> None:
    """Run the ToTask action described by JOB on a Ray cluster."""
    _setup_logging(verbose)
    from totask_ray.cluster import shutdown_if_started
    from totask_ray.console import print_result
    from totask_ray.errors import RunStopped, ToTaskError
    from totask_ray.params import ParamsError, ToTaskParams
    from totask_ray.platform.connect import config_from_env, platform_from_env
    from totask_ray.platform.errors import PlatformError
    from totask_ray.platform.label_studio.config import WriteAs, load_release_files
    from totask_ray.run.driver import run_to_task

    try:
        params = ToTaskParams.from_file(job)
        name = platform or platform_from_env()
        if name == "label-studio":
            if write not in tuple(WriteAs):
                raise PlatformError(f"--write takes predictions or annotations, not {write!r}")
            config = config_from_env(
                name, host=host, api_key=token, model_version=model_version, write=write,
                releases=load_release_files(release or []),
            )  # fmt: skip
        else:
            config = config_from_env(name, host=host, access_token=token, tenant=tenant)
    except (ParamsError, PlatformError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_FAILED) from None
    action_cls = load_action_class(plugin)
    # Ray is reached only once the platform has answered (the run's first step): a wrong address or
    # a refused token fails in a second, not after a local cluster was started for nothing.
    try:
        result = run_to_task(
            params, platform=config, action_cls=action_cls, report=report, job_id=job_id, dry_run=dry_run,
            resume=resume, num_actors=num_actors, concurrency=concurrency, allowed_hosts=allow_host or [],
            verbose_ray=verbose, stop_timeout_s=stop_timeout, ray_address=address,
        )  # fmt: skip
    except ToTaskError as exc:
        typer.echo(f"ToTask failed: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except RunStopped as exc:
        if exc.result is not None:
            print_result(exc.result)
        raise typer.Exit(EXIT_STOPPED) from None
    finally:
        shutdown_if_started()
    print_result(result)
    raise typer.Exit(result.exit_code)


@app.command()
def demo(
    method: Annotated[str, typer.Option(help="file, inference, or all (file then faces and OCR)")] = "file",
    tasks: Annotated[int, typer.Option(help="Tasks to seed.")] = 200,
    data_dir: Annotated[
        Path | None, typer.Option(help="Platform data dir (default: a temporary one).")
    ] = None,
) -> None:
    """Start a local Ray and the embedded platform, seed a demo project, run, print, stop."""
    _setup_logging(False)
    from totask_ray.demo import run_demo

    raise typer.Exit(run_demo(method=method, tasks=tasks, data_dir=data_dir))


def main() -> None:
    app()
