"""A release as one Ray Serve application: the one description every way of deploying it shares.

``totask-ray serve deploy`` and a run (through :class:`~totask_ray.serving.lifecycle.RayServeBackend`)
build the app from :func:`serve_application`; ``totask-ray serve config`` prints the same object as
the ``applications:`` entry of a Serve config file, which ``serve deploy`` and a KubeRay RayService's
``serveConfigV2`` take. Name, route prefix, import path, builder args (replica resources, replica
count or autoscaling, batching, the app's options) and logging are decided here once, so a config
written for Kubernetes cannot drift from what the CLI deploys.

An entrypoint is either an app builder (``build_app(args)``, totask-ray's apps) or a deployment class
(the Synapse SDK's way). A Serve config can only name a builder, so a class is reached through
:func:`totask_ray.serving.sdk_app.build_app`, a builder that binds it exactly as a direct deploy
did (:func:`~totask_ray.serving.lifecycle.bind_deployment_class`). Telling the two apart imports the
entrypoint's module, as deploying does: print the config where the app's code is installed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from totask_ray.serving.config import PreProcessorRelease, ReleaseConfig
from totask_ray.serving.resources import deployment_args

__all__ = [
    "SDK_BUILDER",
    "ServeAppError",
    "ServeApplication",
    "import_attr",
    "not_importable",
    "serve_application",
    "serve_config",
]

SDK_BUILDER = "totask_ray.serving.sdk_app:build_app"

# Replica access logs halve throughput (shared/reference/ray-2.60-notes.md).
_LOGGING = {"enable_access_log": False}


class ServeAppError(LookupError):
    """The release cannot be described as a Serve application; the message says what to fix."""


def not_importable(exc: BaseException, what_to_do: str) -> str:
    """The words for a release whose entrypoint does not import in this process (both CLIs that
    describe an app without deploying it: `serve config`, `kube render`)."""
    return (
        f"the release's entrypoint cannot be imported here ({type(exc).__name__}: {exc}); "
        f"{what_to_do} where the app's package is installed"
    )


def import_attr(path: str) -> Any:
    """``module.path:name`` -> the object (what Serve does with an ``import_path``)."""
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _is_deployment_class(entry: Any) -> bool:
    from ray import serve

    return inspect.isclass(entry) or isinstance(entry, serve.Deployment)


class ServeApplication(BaseModel):
    """One entry of a Serve config's ``applications:`` (Ray's ``ServeApplicationSchema`` fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    route_prefix: str
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)
    logging_config: dict[str, Any] = Field(default_factory=lambda: dict(_LOGGING))

    @property
    def is_sdk_class(self) -> bool:
        return self.import_path == SDK_BUILDER

    def with_model_options(self, **options: Any) -> ServeApplication:
        """The same app with more of the model's constructor ``options`` (a run's planned threads);
        a deployment class takes its options as they are, so it is returned unchanged."""
        if self.is_sdk_class:
            return self
        args = {**self.args, "options": {**self.args.get("options", {}), **options}}
        return self.model_copy(update={"args": args})

    def build(self) -> Any:
        """The ``serve.Application``, built as Serve builds a config's entry (import, call with args)."""
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

        return call_user_app_builder_with_args_if_necessary(import_attr(self.import_path), self.args)

    def to_config(self) -> dict[str, Any]:
        """The ``applications:`` entry, JSON-safe (what ``serveConfigV2`` embeds)."""
        return self.model_dump(mode="json")


def serve_application(
    release: PreProcessorRelease | ReleaseConfig,
    payload: Mapping[str, Any] | None = None,
    *,
    autoscaling_config: Mapping[str, Any] | None = None,
) -> ServeApplication:
    """The Serve application of ``release``: ``payload`` is what was dispatched (the release's own
    ``required_resources`` when omitted); ``autoscaling_config`` (a run's planned count) replaces a
    fixed count. Raises :class:`ServeAppError` when the release deploys nothing, and the import's own
    error when its entrypoint cannot be imported here."""
    rel = release if isinstance(release, PreProcessorRelease) else PreProcessorRelease.from_config(release)
    target = rel.deploy_target
    if target is None:
        raise ServeAppError(
            f"{rel.app_name} declares nothing to deploy "
            "(actions.deployment.entrypoint or actions.inference.entrypoint)"
        )
    entry = import_attr(target.entrypoint)  # ImportError / AttributeError as they are: the caller words them
    args = deployment_args(rel.config, payload)
    if autoscaling_config is not None:
        args = args.model_copy(update={"autoscaling_config": dict(autoscaling_config)})
    dumped = args.model_dump(mode="json", exclude_none=True)
    if _is_deployment_class(entry):
        import_path = SDK_BUILDER
        built_args: dict[str, Any] = {
            "entrypoint": target.entrypoint,
            "batch": target.serve_options.batch_declared,
            "deployment": dumped,
        }
    else:
        import_path, built_args = target.entrypoint, dumped
    return ServeApplication(
        name=rel.app_name, route_prefix=rel.route_prefix, import_path=import_path, args=built_args
    )


def serve_config(*apps: ServeApplication) -> dict[str, Any]:
    """A Serve config file's body (``ServeDeploySchema``) holding ``apps``."""
    return {"applications": [app.to_config() for app in apps]}
