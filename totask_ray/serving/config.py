"""Strict models for a pre-processor release config (``serve_apps/<name>/config.yaml``).

Ray Serve's own config schemas silently drop unknown keys: ``num_gpu: 1`` (for ``num_gpus``) vanishes
and the replica lands on a CPU node. Every model here forbids extra keys, and errors name the key,
what was wrong and what to do, so a typo fails at load time instead of after a deploy.

A release is also what the Synapse SDK publishes (its ``PluginConfig``): its documented keys are
accepted with their types, and what totask-ray acts on (resources, entrypoints, serve options) is
checked strictly. Two release shapes deploy:

- totask-ray's own apps: ``actions.deployment`` names an app builder (``module:build_app``) and the
  app's constructor ``options``; they are called with the batched convention (``predict``);
- an SDK release: ``actions.inference`` names the Serve deployment class (``method: serve``) with its
  ``serve_options``; it is called the SDK's way, one ``POST /`` per task.

:attr:`ReleaseConfig.deploy_target` says which of the two is deployed, so nothing else needs to know.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ActionConfig",
    "Actions",
    "BatchOptions",
    "Convention",
    "DeployTarget",
    "DeploymentAction",
    "InferenceAction",
    "PluginRequires",
    "PreProcessorRelease",
    "ReleaseConfig",
    "ReleaseConfigError",
    "RequiredResources",
    "ServeOptions",
    "load_release_config",
    "parse_release_config",
]

Convention = Literal["batched", "synapse"]
ENTRYPOINT = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
# The actions totask-ray reads; an action named close to one of them is taken for a typo.
OWN_ACTIONS = ("inference", "deployment")
# The SDK's well-known action names (synapse_sdk.plugins.enums.ACTION_DEFAULT_METHODS): never typos.
SDK_ACTIONS = frozenset(
    {
        "upload",
        "export",
        "download",
        "convert",
        "train",
        "test",
        "deployment",
        "inference",
        "to_task",
        "auto_label",
    }
)


class ReleaseConfigError(ValueError):
    """A release config that cannot be used; the message names the key and the fix."""


def _no_bool(v: Any) -> Any:
    # YAML turns `yes`/`true` into booleans; `num_gpus: yes` must not become 1.
    if isinstance(v, bool):
        raise ValueError("expected a number, got a boolean")
    return v


def _finite_non_negative(v: float) -> float:
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"expected a finite number >= 0, got {v}")
    return v


# int stays int and float stays float, so the dispatch payload keeps the declared type (2, not 2.0).
Amount = Annotated[int | float, BeforeValidator(_no_bool), AfterValidator(_finite_non_negative)]
Count = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
Bytes = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequiredResources(_Strict):
    """``actions.inference.required_resources``: what one replica needs (see resources.py)."""

    required_cpu_count: Amount | None = None
    num_cpus: Amount | None = None
    required_gpu_count: Amount | None = None
    num_gpus: Amount | None = None
    num_replicas: Count | None = None
    memory: Bytes | None = None
    memory_bytes: Bytes | None = None


Seconds = Annotated[float, BeforeValidator(_no_bool), Field(gt=0.0, allow_inf_nan=False)]


def _none_is_default(v: Any) -> Any:
    # An SDK-dumped config writes unset sections as null (`serve_options: null`): same as absent.
    return {} if v is None else v


class BatchOptions(_Strict):
    max_batch_size: Count = 8
    batch_wait_timeout_s: Annotated[float, Field(ge=0.0, le=60.0, allow_inf_nan=False)] = 0.01


class ServeOptions(_Strict):
    """``serve_options``: the Ray Serve deployment options the SDK documents
    (``BaseDeploymentAction.get_serve_options``), plus ``batch`` for ``@serve.batch``."""

    num_replicas: Count | None = None
    max_ongoing_requests: Count | None = None
    max_queued_requests: Annotated[int, BeforeValidator(_no_bool), Field(ge=-1)] | None = None
    autoscaling_config: dict[str, Any] | None = None
    health_check_period_s: Seconds | None = None
    health_check_timeout_s: Seconds | None = None
    graceful_shutdown_timeout_s: Seconds | None = None
    graceful_shutdown_wait_loop_s: Seconds | None = None
    batch: Annotated[BatchOptions, BeforeValidator(_none_is_default)] = Field(default_factory=BatchOptions)

    @model_validator(mode="after")
    def _fixed_or_autoscaled(self) -> ServeOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("num_replicas and autoscaling_config are both set; Ray Serve takes one of them")
        return self

    @property
    def batch_declared(self) -> bool:
        """Whether ``batch`` was written, as the SDK applies ``@serve.batch`` only then."""
        return "batch" in self.model_fields_set


class ActionConfig(_Strict):
    """``actions.<name>``: the SDK's ``ActionConfig`` keys, for actions totask-ray does not run."""

    name: str | None = None
    description: str = ""
    entrypoint: str = ""
    method: Literal["job", "task", "serve", "restapi"] | None = None
    params_schema: Any = None
    input_type: str | None = None
    output_type: str | None = None
    serve_options: dict[str, Any] | None = None


class _Deployable(ActionConfig):
    """An action totask-ray may deploy: its ``serve_options`` and app ``options`` are checked."""

    serve_options: Annotated[ServeOptions, BeforeValidator(_none_is_default)] = Field(
        default_factory=ServeOptions
    )
    # The app's own constructor options (e.g. a detector's thresholds), passed to the app as given.
    options: Annotated[dict[str, Any], BeforeValidator(_none_is_default)] = Field(default_factory=dict)

    @field_validator("entrypoint")
    @classmethod
    def _module_colon_name(cls, v: str) -> str:
        if v and not re.match(ENTRYPOINT, v):
            raise ValueError(f"String should match pattern '{ENTRYPOINT}' (module.path:name)")
        return v


class InferenceAction(_Deployable):
    """``actions.inference``: the SDK's ``ActionConfig`` plus what totask-ray reads.

    ``convention`` is how a task reaches the app: ``batched`` (totask-ray's ``predict(images, params)``
    handle method, one call per batch) or ``synapse`` (the SDK's ``POST /``-style request
    ``{"image_path": url, ...params}`` through the app's handle, one per task). ``requires_model``
    says whether a call needs the platform's ``model`` (the SDK's deployments fetch one per request).
    Both default from the release's shape (see :class:`ReleaseConfig`).
    """

    required_resources: Annotated[RequiredResources, BeforeValidator(_none_is_default)] = Field(
        default_factory=RequiredResources
    )
    convention: Convention | None = None
    requires_model: bool | None = None


class DeploymentAction(_Deployable):
    """``actions.deployment``: totask-ray's own apps, an app builder and its ``options``."""

    entrypoint: str = Field(pattern=ENTRYPOINT)


class Actions(_Strict):
    """``actions``: any action name, as in the SDK; the two totask-ray reads are typed strictly."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ActionConfig] = Field(init=False)  # type: ignore[assignment]

    inference: Annotated[InferenceAction, BeforeValidator(_none_is_default)] = Field(
        default_factory=InferenceAction
    )
    deployment: DeploymentAction | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_near_miss(cls, data: Any) -> Any:
        # Any action name is valid in the SDK, so `deploy:` for `deployment:` would pass unnoticed
        # and the release would have nothing to deploy; a name this close to ours is refused.
        if isinstance(data, Mapping):
            for name in data:
                if str(name) in SDK_ACTIONS or str(name) in OWN_ACTIONS:
                    continue
                close = difflib.get_close_matches(str(name), OWN_ACTIONS, n=1, cutoff=0.75)
                if close:
                    raise PydanticCustomError(
                        "near_miss_action",
                        "unknown key; did you mean '{close}'? rename it",
                        {"name": str(name), "close": close[0]},
                    )
        return data


class PluginRequires(_Strict):
    """``requires``: compatibility specifiers (PEP 440), as the SDK declares them."""

    sdk: str | None = None
    python: str | None = None
    cuda: str | None = None


@dataclass(frozen=True)
class DeployTarget:
    """What to deploy for a release, wherever the config put it (see :attr:`ReleaseConfig.deploy_target`).

    ``source`` is the action it came from (``"deployment"`` or ``"inference"``). The objects are the
    config's own, not copies: a change to ``options`` (an allow-list added before deploying) shows.
    """

    source: Literal["deployment", "inference"]
    entrypoint: str
    serve_options: ServeOptions
    options: dict[str, Any]

    @property
    def key(self) -> str:
        return f"actions.{self.source}"


class ReleaseConfig(_Strict):
    """A release config: the SDK's ``PluginConfig`` keys; what totask-ray uses is checked strictly."""

    code: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=100)
    name: str = Field(min_length=1)
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=64)
    description: str = ""
    actions: Annotated[Actions, BeforeValidator(_none_is_default)] = Field(default_factory=Actions)

    # The SDK's PluginConfig keys that totask-ray does not act on: typed as the SDK types them,
    # enums as plain strings so that a newer SDK's values do not fail an older totask-ray.
    variant: str | None = None
    category: str | None = None
    readme: str | None = None
    package_manager: str | None = None
    package_manager_options: list[str] | None = None
    wheels_dir: str | None = None
    env: dict[str, Any] | None = None
    runtime_env: dict[str, Any] | None = None
    data_type: str | None = None
    tasks: list[str] | None = None
    supported_data_types: list[str] | None = Field(
        None, validation_alias=AliasChoices("supported_data_types", "supported_data_type")
    )
    supported_annotation_tools: dict[str, list[str]] | None = None
    annotation_category: str | None = None
    annotation_type: str | None = None
    # The SDK's own plugin template writes `smart_tool_type` (which PluginConfig then drops).
    smart_tool: str | None = Field(None, validation_alias=AliasChoices("smart_tool", "smart_tool_type"))
    requires: PluginRequires | None = None
    dependencies: dict[str, str] | None = None
    tags: list[str] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> ReleaseConfig:
        inference, deployment = self.actions.inference, self.actions.deployment
        if deployment is not None and inference.entrypoint:
            raise ValueError(
                "two entrypoints to deploy (actions.deployment.entrypoint and "
                "actions.inference.entrypoint); keep one"
            )
        if deployment is not None and inference.serve_options != ServeOptions():
            raise ValueError(
                "serve_options is declared twice (actions.deployment.serve_options and "
                "actions.inference.serve_options); keep the deployment's"
            )
        if deployment is not None and inference.options:
            raise ValueError(
                "options is declared twice (actions.deployment.options and actions.inference.options); "
                "keep the deployment's"
            )
        return self

    @model_validator(mode="after")
    def _one_replica_count(self) -> ReleaseConfig:
        declared = self.actions.inference.required_resources.num_replicas
        target = self.deploy_target
        serve = target.serve_options.num_replicas if target else None
        if declared is not None and serve is not None and declared != serve:
            raise ValueError(
                "num_replicas is declared twice with different values "
                f"(actions.inference.required_resources.num_replicas={declared}, "
                f"{target.key if target else 'actions'}.serve_options.num_replicas={serve}); keep one"
            )
        if declared is not None and target is not None and target.serve_options.autoscaling_config:
            raise ValueError(
                "actions.inference.required_resources.num_replicas and "
                f"{target.key}.serve_options.autoscaling_config are both set; Ray Serve takes one of them"
            )
        return self

    @property
    def app_name(self) -> str:
        return f"{self.code}@{self.version}"

    @property
    def deploy_target(self) -> DeployTarget | None:
        """``actions.deployment`` (totask-ray's apps), else ``actions.inference`` when it names an
        entrypoint (an SDK release), else ``None``: there is nothing to deploy."""
        deployment = self.actions.deployment
        if deployment is not None:
            return DeployTarget(
                "deployment", deployment.entrypoint, deployment.serve_options, deployment.options
            )
        inference = self.actions.inference
        if inference.entrypoint:
            return DeployTarget("inference", inference.entrypoint, inference.serve_options, inference.options)
        return None

    @property
    def serve_options(self) -> ServeOptions:
        """The deployed app's serve options (defaults when nothing is deployed)."""
        target = self.deploy_target
        return target.serve_options if target is not None else ServeOptions()

    @property
    def max_batch_size(self) -> int:
        """The app's serve-side batch window (``serve_options.batch.max_batch_size``, 8 if not written):
        what the SDK hands a ToTask plugin as ``context.inference["max_batch_size"]``."""
        return self.serve_options.batch.max_batch_size

    @property
    def convention(self) -> Convention:
        """How tasks reach the app: declared, else ``batched`` for our apps and ``synapse`` otherwise."""
        declared = self.actions.inference.convention
        if declared is not None:
            return declared
        return "batched" if self.actions.deployment is not None else "synapse"

    @property
    def requires_model(self) -> bool:
        """Whether a call needs the platform's ``model``: declared, else true for the SDK convention."""
        declared = self.actions.inference.requires_model
        return declared if declared is not None else self.convention == "synapse"


class PreProcessorRelease(_Strict):
    """A release as the platform knows it: its id plus the config it was published with."""

    id: int | str | None = None
    code: str
    version: str
    config: ReleaseConfig

    @model_validator(mode="after")
    def _matches_config(self) -> PreProcessorRelease:
        if (self.code, self.version) != (self.config.code, self.config.version):
            raise ValueError(
                f"release {self.code}@{self.version} carries a config for "
                f"{self.config.code}@{self.config.version}; publish the config with this release"
            )
        return self

    @classmethod
    def from_config(cls, config: ReleaseConfig, id: int | str | None = None) -> PreProcessorRelease:
        return cls(id=id, code=config.code, version=config.version, config=config)

    @property
    def app_name(self) -> str:
        """The Ray Serve application name, ``code@version``."""
        return f"{self.code}@{self.version}"

    @property
    def route_prefix(self) -> str:
        """``/`` + md5 of ``code@version``: the route the platform forwards inference calls to."""
        return "/" + hashlib.md5(self.app_name.encode()).hexdigest()

    @property
    def deploy_target(self) -> DeployTarget | None:
        return self.config.deploy_target

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def convention(self) -> Convention:
        return self.config.convention

    @property
    def requires_model(self) -> bool:
        return self.config.requires_model


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _extra_model(model: type[BaseModel]) -> type[BaseModel] | None:
    """The model of a mapping's free-named entries (``actions.<name>``), if it has them."""
    return ActionConfig if model is Actions else None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that the error location points into, for 'did you mean'."""
    model: type[BaseModel] | None = ReleaseConfig
    for part in loc[:-1]:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        model = _nested_model(field.annotation) if field is not None else _extra_model(model)
    return list(model.model_fields) if model is not None else []


def _describe(err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "near_miss_action":
        loc = (*loc, err["ctx"]["name"])
        return f"{'.'.join(str(p) for p in loc)}: {err['msg']}"
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{key}: unknown key; {hint}remove or rename it (allowed here: {', '.join(allowed)})"
    if err["type"] == "missing":
        return f"{key}: required key is missing; add it"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    text = f"{key}: {msg}"
    if got is not None and not isinstance(got, (dict, list)):
        shown = repr(got)
        text += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    if loc and loc[-1] == "version" and isinstance(got, (int, float)):
        text += '; quote it in YAML, e.g. version: "1.0"'
    return text


def parse_release_config(data: Any, *, source: str = "release config") -> ReleaseConfig:
    """Validate a mapping (e.g. ``plugin_releases/{id}/``'s ``config``) into a :class:`ReleaseConfig`."""
    if not isinstance(data, Mapping):
        raise ReleaseConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ReleaseConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ReleaseConfigError(f"{source}: {problems}") from exc


def load_release_config(path: str | Path) -> ReleaseConfig:
    """Load ``config.yaml`` from a file or from an app directory that contains one."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.yaml"
    if not p.is_file():
        raise ReleaseConfigError(f"{p}: no such file; pass an app directory with a config.yaml or the file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ReleaseConfigError(f"{p}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from exc
    return parse_release_config(data, source=str(p))
