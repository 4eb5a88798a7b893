"""``totask-ray serve``: the pre-processor lifecycle for a person at a terminal.

The same detect / capacity gate / dispatch / wait as a pipeline run, with each step printed as it
happens (a capacity verdict right away, not after the timeout) and a non-zero exit code on failure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from totask_ray.serving.application import ServeAppError, not_importable, serve_application, serve_config
from totask_ray.serving.capacity import CapacityError, node_types_from_cluster_yaml
from totask_ray.serving.config import PreProcessorRelease, ReleaseConfigError, load_release_config
from totask_ray.serving.lifecycle import RayServeBackend, ensure_running

serve_app = typer.Typer(
    name="serve",
    help="Deploy, inspect and delete pre-processors (Ray Serve applications named code@version).",
    no_args_is_help=True,
)

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NO_CLUSTER = 3

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray cluster address (default: RAY_ADDRESS or the running local cluster)."
    ),
]


class _EchoHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(record.getMessage())


@contextmanager
def _progress() -> Iterator[None]:
    """Print the lifecycle's INFO lines (capacity verdict, dispatch) as they happen."""
    logger = logging.getLogger("totask_ray.serving.lifecycle")
    handler = _EchoHandler(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _backend(
    address: str | None, http_host: str | None = None, http_port: int | None = None
) -> RayServeBackend:
    import ray

    http = {k: v for k, v in (("host", http_host), ("port", http_port)) if v is not None} or None
    backend = RayServeBackend(address, http_options=http)
    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as exc:
            typer.echo(
                f"error: no Ray cluster at {address or 'RAY_ADDRESS / the local cluster'} "
                f"({type(exc).__name__}); start one with `ray start --head` or pass --address",
                err=True,
            )
            raise typer.Exit(EXIT_NO_CLUSTER) from exc
    return backend


@serve_app.command()
def deploy(
    app: Annotated[
        Path,
        typer.Argument(
            metavar="APP_DIR_OR_CONFIG", help="An app directory with a config.yaml, or the config file."
        ),
    ],
    address: AddressOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for RUNNING.")] = 180.0,
    poll_interval: Annotated[float, typer.Option(help="Seconds between status polls.")] = 1.0,
    cluster_yaml: Annotated[
        Path | None, typer.Option(help="Node types the autoscaler may add, from a cluster launcher config.")
    ] = None,
    capacity_check: Annotated[
        bool, typer.Option(help="Refuse at dispatch what the cluster can never hold.")
    ] = True,
    http_host: Annotated[str | None, typer.Option(help="Serve HTTP host if this starts Serve.")] = None,
    http_port: Annotated[int | None, typer.Option(help="Serve HTTP port if this starts Serve.")] = None,
) -> None:
    """Deploy a pre-processor unless it is already running, and wait until it is RUNNING."""
    try:
        release = PreProcessorRelease.from_config(load_release_config(app))
        node_types = node_types_from_cluster_yaml(cluster_yaml) if cluster_yaml else None
    except (ReleaseConfigError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    backend = _backend(address, http_host, http_port)
    typer.echo(f"{release.app_name}: route {release.route_prefix}")
    try:
        with _progress():
            result = ensure_running(
                release,
                backend,
                poll_interval_s=poll_interval,
                timeout_s=timeout,
                check_capacity=capacity_check,
                node_types=node_types,
            )
    except CapacityError as exc:
        typer.echo(f"error: capacity never_fits: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from exc
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        if exc.__cause__ is not None:
            typer.echo(f"cause: {exc.__cause__}"[:2000], err=True)
        typer.echo(f"inspect with `totask-ray serve status {release.app_name}`", err=True)
        raise typer.Exit(EXIT_FAILED) from exc
    verb = "started" if result.started else "already running"
    typer.echo(f"{result.app_name}: RUNNING ({verb}, {result.elapsed_s:.1f} s)")


@serve_app.command("config")
def config_(
    app: Annotated[
        Path,
        typer.Argument(
            metavar="APP_DIR_OR_CONFIG", help="An app directory with a config.yaml, or the config file."
        ),
    ],
    output: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
) -> None:
    """Print the Serve config of a pre-processor (what `serve deploy` and a RayService's serveConfigV2 take).

    It is the application `totask-ray serve deploy` deploys, described by the same code: name, route
    prefix, import path and builder args (replica resources, count or autoscaling, batching, options).
    """
    import json

    import yaml

    if output not in ("yaml", "json"):
        typer.echo(f"error: --format {output!r}: use yaml or json", err=True)
        raise typer.Exit(EXIT_CONFIG)
    try:
        release = PreProcessorRelease.from_config(load_release_config(app))
        body = serve_config(serve_application(release))
    except (ReleaseConfigError, ServeAppError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    except (ImportError, AttributeError) as exc:
        typer.echo(f"error: {not_importable(exc, 'run this')}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    if output == "json":
        typer.echo(json.dumps(body, indent=2))
    else:
        typer.echo(yaml.safe_dump(body, sort_keys=False), nl=False)


@serve_app.command()
def status(
    name: Annotated[
        str | None, typer.Argument(metavar="[CODE@VERSION]", help="One app; all apps if omitted.")
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Show Serve applications and their status (exit 1 if the named app is missing or failed)."""
    backend = _backend(address)
    if name is None:
        apps = backend.list_applications()
        if not apps:
            typer.echo("no Serve applications")
        for app_name, app_status in sorted(apps.items()):
            typer.echo(f"{app_name}\t{app_status}")
        return
    entries = backend.status(name)
    if not entries:
        typer.echo(f"{name}: not deployed", err=True)
        raise typer.Exit(EXIT_FAILED)
    entry = entries[0]
    typer.echo(f"{name}\t{entry['status']}")
    if entry.get("message"):
        typer.echo(f"  {entry['message']}")
    for dep, info in entry.get("deployments", {}).items():
        replicas = ", ".join(f"{k}={v}" for k, v in info.get("replica_states", {}).items())
        typer.echo(f"  {dep}\t{info['status']}\t{replicas}")
        if info.get("message"):
            typer.echo(f"    {info['message']}")
    if entry["status"] not in ("RUNNING", "DEPLOYING", "NOT_STARTED"):
        raise typer.Exit(EXIT_FAILED)


@serve_app.command()
def delete(
    name: Annotated[str, typer.Argument(metavar="CODE@VERSION")],
    address: AddressOpt = None,
) -> None:
    """Delete a Serve application (exit 1 if there is none by that name)."""
    backend = _backend(address)
    if not backend.delete(name):
        typer.echo(f"{name}: not deployed", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"{name}: deleted")
