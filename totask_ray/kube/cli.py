"""``totask-ray kube render``: a job file -> the KubeRay manifests and the image to run it with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

kube_app = typer.Typer(
    name="kube",
    help="Kubernetes with KubeRay: render a job's RayCluster, RayJob, RayService and Dockerfile.",
    no_args_is_help=True,
)

EXIT_CONFIG = 2


@kube_app.command()
def render(
    job: Annotated[Path, typer.Argument(help="The job file, YAML or JSON (as `totask-ray run` takes it).")],
    image: Annotated[str, typer.Option(help="The image built from the rendered Dockerfile.")],
    out: Annotated[Path, typer.Option(help="The folder to write the tree into (created).")],
    release: Annotated[
        list[str] | None,
        typer.Option(help="The job's pre-processor release config, ID=path/to/config.yaml (inference)."),
    ] = None,
    gpu_image: Annotated[
        str | None, typer.Option(help="The GPU group's image (the Dockerfile's -gpu build); default --image.")
    ] = None,
    platform: Annotated[str, typer.Option(help="synapse or label-studio.")] = "synapse",
    cluster_name: Annotated[str, typer.Option(help="The warm RayCluster's name.")] = "totask",
    secret: Annotated[str, typer.Option(help="The Secret holding the platform's credentials.")] = (
        "totask-platform"
    ),
    cpu_workers: Annotated[int, typer.Option(help="Most CPU worker pods (from zero).")] = 4,
    gpu_workers: Annotated[int, typer.Option(help="Most GPU worker pods (from zero).")] = 2,
    idle_timeout: Annotated[int, typer.Option(help="Seconds before an idle worker pod is removed.")] = 600,
    deadline: Annotated[int, typer.Option(help="The RayJob's activeDeadlineSeconds.")] = 6 * 3600,
    retries: Annotated[int, typer.Option(help="The RayJob's backoffLimit; each retry resumes.")] = 2,
) -> None:
    """Write a kustomize tree for JOB: `kubectl apply -k OUT/overlays/gpu` (or cpu, or warm)."""
    from totask_ray.kube.inputs import RenderError, read_job
    from totask_ray.kube.options import KubeOptions, Pool
    from totask_ray.kube.render import render as render_tree
    from totask_ray.serving.application import ServeAppError, not_importable

    try:
        opts = KubeOptions(
            image=image,
            gpu_image=gpu_image,
            platform=platform,  # type: ignore[arg-type]
            cluster_name=cluster_name,
            secret_name=secret,
            cpu_pool=Pool(max_replicas=cpu_workers),
            gpu_pool=Pool(gpus=1, max_replicas=gpu_workers),
            idle_timeout_s=idle_timeout,
            active_deadline_s=deadline,
            backoff_limit=retries,
        )
        tree = render_tree(read_job(job, release or []), opts, out_label=str(out))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        typer.echo(f"error: {where}: {first['msg']}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except (RenderError, ServeAppError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except (ImportError, AttributeError) as exc:
        typer.echo(f"error: {not_importable(exc, 'render')}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    for path in tree.write(out):
        typer.echo(str(path))
    typer.echo(
        f"next: fill in {out / 'secret.example.yaml'} and `kubectl apply -f` it, build the image from "
        f"{out / 'Dockerfile'}, then `kubectl apply -k {out / 'overlays' / 'gpu'}` (or cpu, or warm)"
    )
