"""The app builder behind a release whose entrypoint is a deployment class (the Synapse SDK's way).

A Serve config's ``import_path`` must name an application or a builder, never a bare class, so a
class release is deployed through :func:`build_app`, from a config (``serve deploy``, a RayService)
and from ``totask-ray serve deploy`` alike (see :mod:`totask_ray.serving.application`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from totask_ray.serving.application import import_attr
from totask_ray.serving.config import ENTRYPOINT
from totask_ray.serving.lifecycle import bind_deployment_class
from totask_ray.serving.resources import DeploymentArgs

__all__ = ["SdkAppArgs", "build_app"]


class SdkAppArgs(BaseModel):
    """The builder's args: the class to deploy, whether to batch ``infer_batch``, its deployment."""

    model_config = ConfigDict(extra="forbid")

    entrypoint: str = Field(pattern=ENTRYPOINT)
    batch: bool = False
    deployment: DeploymentArgs = Field(default_factory=DeploymentArgs)


def build_app(args: dict[str, Any]) -> Any:
    """Bind the release's class with its serve options and constructor options."""
    parsed = SdkAppArgs.model_validate(args)
    return bind_deployment_class(import_attr(parsed.entrypoint), parsed.deployment, batch=parsed.batch)
