"""Strict models for a pre-processor release config (``serve_apps/<name>/config.yaml``).

Ray Serve's own config schemas silently drop unknown keys: ``num_gpu: 1`` (for ``num_gpus``) vanishes
and the replica lands on a CPU node. Every model here forbids extra keys, and errors name the key,
what was wrong and what to do, so a typo fails at load time instead of after a deploy.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

__all__ = [
    "Actions",
    "BatchOptions",
    "DeploymentAction",
    "InferenceAction",
    "PreProcessorRelease",
    "ReleaseConfig",
    "ReleaseConfigError",
    "RequiredResources",
    "ServeOptions",
    "load_release_config",
    "parse_release_config",
]


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


class BatchOptions(_Strict):
    max_batch_size: Count = 8
    batch_wait_timeout_s: Annotated[float, Field(ge=0.0, le=60.0, allow_inf_nan=False)] = 0.01


class ServeOptions(_Strict):
    num_replicas: Count | None = None
    max_ongoing_requests: Count | None = None
    batch: BatchOptions = Field(default_factory=BatchOptions)


class InferenceAction(_Strict):
    required_resources: RequiredResources = Field(default_factory=RequiredResources)


class DeploymentAction(_Strict):
    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    serve_options: ServeOptions = Field(default_factory=ServeOptions)
    # The app's own constructor options (e.g. a detector's thresholds), passed to build_app as given.
    options: dict[str, Any] = Field(default_factory=dict)


class Actions(_Strict):
    inference: InferenceAction = Field(default_factory=InferenceAction)
    deployment: DeploymentAction | None = None


class ReleaseConfig(_Strict):
    code: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=100)
    name: str = Field(min_length=1)
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=64)
    description: str = ""
    actions: Actions = Field(default_factory=Actions)

    @model_validator(mode="after")
    def _one_replica_count(self) -> ReleaseConfig:
        declared = self.actions.inference.required_resources.num_replicas
        deployment = self.actions.deployment
        serve = deployment.serve_options.num_replicas if deployment else None
        if declared is not None and serve is not None and declared != serve:
            raise ValueError(
                "num_replicas is declared twice with different values "
                f"(actions.inference.required_resources.num_replicas={declared}, "
                f"actions.deployment.serve_options.num_replicas={serve}); keep one"
            )
        return self

    @property
    def app_name(self) -> str:
        return f"{self.code}@{self.version}"


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


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that the error location points into, for 'did you mean'."""
    model: type[BaseModel] = ReleaseConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        nested = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)]
        nested = [a for a in nested if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _describe(err: Mapping[str, Any]) -> str:
    loc = tuple(err["loc"])
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
        text += f" (got {got!r})"
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
