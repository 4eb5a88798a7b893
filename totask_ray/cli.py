"""`totask-ray`: run, preview, demo, platform, serve, kube.

Exit codes of `run`: 0 every task succeeded, 2 some tasks failed, 1 the run failed (bad params,
a critical error, or every task failed). Messages go to stderr without tokens or stack traces.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from totask_ray.embedded.cli import platform_app
from totask_ray.kube.cli import kube_app
from totask_ray.ledger.cli import diff as ledger_diff
from totask_ray.ledger.cli import undo as ledger_undo
from totask_ray.platform.cli_options import CliOption
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
app.add_typer(serve_app, name="serve", help="Pre-processors on Ray Serve: deploy, config, status, delete.")
app.add_typer(kube_app, name="kube", help="Kubernetes with KubeRay: render a job's manifests and image.")
app.command(name="undo")(ledger_undo)
app.command(name="diff")(ledger_diff)


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


def _run_options() -> list[inspect.Parameter]:
    """`run`'s options, each from where it is declared: every platform's `CliOption`s (a flag two
    platforms share is one option) and every `RunOptions` field with a `cli` flag, its description
    the help. Their parameter names are `platform:<flag>` / the field's name, made identifiers."""
    from totask_ray.pipeline.spec import RunOptions, cli_flags
    from totask_ray.platform.connect import KINDS

    params: list[inspect.Parameter] = []
    by_flag: dict[str, list[tuple[str, CliOption]]] = {}
    for kind in KINDS:
        for option in kind.options:
            by_flag.setdefault(option.flag, []).append((kind.title, option))
    for flag, owners in by_flag.items():
        first = owners[0][1]
        if len(owners) > 1:
            envs = " or ".join(f"${o.env}" for _, o in owners if o.env)
            text = f"{first.help} (default: {envs})." if envs else f"{first.help}."
        else:
            env = f" (default: ${first.env})" if first.env else ""
            text = f"{owners[0][0]}: {first.help}{env}."
        kind_of = list[str] | None if first.multiple else str | None
        params.append(_option(_PLATFORM + flag.replace("-", "_"), kind_of, None, flag, text))
    for name, flag in cli_flags().items():
        field = RunOptions.model_fields[name]
        default = field.get_default(call_default_factory=True)
        annotation = field.annotation
        if default == []:  # a repeatable option: typer takes None for "not given"
            annotation, default = annotation | None, None
        params.append(_option(name, annotation, default, flag, field.description or ""))
    return params


_PLATFORM = "platform_"


def _option(name: str, annotation: Any, default: Any, flag: str, text: str) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, typer.Option(f"--{flag}", help=text)],
    )


def run(
    job: Path,
    platform: str | None = None,
    plugin: str | None = None,
    **options: Any,
) -> None:
    """Run the ToTask action described by JOB on a Ray cluster."""
    verbose = bool(options.get("verbose_ray"))
    _setup_logging(verbose)
    from totask_ray.cluster import shutdown_if_started
    from totask_ray.console import print_result
    from totask_ray.errors import RunStopped, ToTaskError
    from totask_ray.params import ParamsError, ToTaskParams
    from totask_ray.platform.connect import config_from_cli
    from totask_ray.platform.errors import PlatformError
    from totask_ray.run.driver import run_to_task

    given = {k[len(_PLATFORM) :].replace("_", "-"): v for k, v in options.items() if k.startswith(_PLATFORM)}
    run_options = {k: v for k, v in options.items() if not k.startswith(_PLATFORM)}
    try:
        params = ToTaskParams.from_file(job)
        config = config_from_cli(platform, given)
    except (ParamsError, PlatformError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_FAILED) from None
    action_cls = load_action_class(plugin)
    # Ray is reached only once the platform has answered (the run's first step): a wrong address or
    # a refused token fails in a second, not after a local cluster was started for nothing.
    try:
        result = run_to_task(params, platform=config, action_cls=action_cls, **run_options)
    except ToTaskError as exc:
        typer.echo(f"ToTask failed: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except ParamsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except RunStopped as exc:
        if exc.result is not None:
            print_result(exc.result)
        raise typer.Exit(EXIT_STOPPED) from None
    finally:
        shutdown_if_started()
    print_result(result)
    if result.ledger is not None:
        typer.echo(f"run {result.run_id}: undo with `totask-ray undo {result.ledger}`", err=True)
    raise typer.Exit(result.exit_code)


def _platform_help() -> str:
    from totask_ray.platform.connect import PLATFORMS

    return (
        f"{' or '.join(PLATFORMS)} (default: label-studio when $LABEL_STUDIO_URL and "
        "$LABEL_STUDIO_API_KEY are set and $SYNAPSE_HOST is not, else synapse)."
    )


run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter(
            "job",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[
                Path, typer.Argument(help="Job parameters, YAML or JSON (Synapse ToTask names).")
            ],
        ),
        _option("platform", str | None, None, "platform", _platform_help()),
        _option("plugin", str | None, None, "plugin", "Your ToTask subclass, e.g. plugin.to_task:ToTask."),
        *_run_options(),
    ]
)
run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command()(run)


def preview(
    job: Path,
    platform: str | None = None,
    plugin: str | None = None,
    sample: int = 20,
    seed: int = 0,
    first: bool = False,
    out: Path = Path("preview.html"),
    **options: Any,
) -> None:
    """Preview JOB on a sample of its tasks: what it would write, drawn on their images, as one HTML
    page. Writes nothing to the platform (a dry run through the job's own prepare, hooks, label
    mapping, thresholds and validation)."""
    _setup_logging(bool(options.get("verbose_ray")))
    from totask_ray.cluster import shutdown_if_started
    from totask_ray.errors import ToTaskError
    from totask_ray.params import ParamsError, ToTaskParams
    from totask_ray.platform.connect import config_from_cli
    from totask_ray.platform.errors import PlatformError
    from totask_ray.preview import SampleError
    from totask_ray.preview import preview as make_preview

    given = {k[len(_PLATFORM) :].replace("_", "-"): v for k, v in options.items() if k.startswith(_PLATFORM)}
    run_options = {k: v for k, v in options.items() if not k.startswith(_PLATFORM)}
    try:
        params = ToTaskParams.from_file(job)
        config = config_from_cli(platform, given)
        page = make_preview(
            params, platform=config, action_cls=load_action_class(plugin), sample=sample, seed=seed,
            first=first, out=out, progress_bar=False, fresh_process=True, **run_options,
        )  # fmt: skip
    except (ParamsError, PlatformError, SampleError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except ToTaskError as exc:
        typer.echo(f"Preview failed: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        shutdown_if_started()
    failed = sum(1 for o in page.outcomes.values() if o["status"] == "failed")
    counts = ", ".join(f"{n} {c}" for c, n in page.counts.items()) or "nothing"
    line = f"{out}: {len(page.outcomes)} of {page.total} tasks, {failed} would fail; would write {counts}"
    if page.estimate is not None and page.estimate.stages:
        e = page.estimate
        line += f". {e.summary()} (then: run it with --projected-s {e.projected_s:.0f})"
    typer.echo(line)


# a preview is a dry run with its own report, and makes the projection itself
_PREVIEW_SETS = {"report", "dry_run", "resume", "job_id", "projected_s"}
preview.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        *list(run.__signature__.parameters.values())[:3],  # type: ignore[attr-defined]
        _option("sample", int, 20, "sample", "How many tasks to preview."),
        _option("seed", int, 0, "seed", "The random sample's seed."),
        _option("first", bool, False, "first", "The first tasks of the listing instead of a random sample."),
        _option("out", Path, Path("preview.html"), "out", "Where to write the page."),
        *(p for p in _run_options() if p.name not in _PREVIEW_SETS),
    ]
)
preview.__annotations__ = {p.name: p.annotation for p in preview.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command()(preview)


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
