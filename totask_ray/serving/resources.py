"""``required_resources`` -> dispatch payload -> deployment options, in one model.

The payload table of the Synapse ToTask action (SYN-7005 / FR-8), exactly:

=============  ===============================================  ==========================
payload key    source on ``required_resources``                 when not declared
=============  ===============================================  ==========================
num_cpus       ``required_cpu_count`` (preferred) or num_cpus   1
num_gpus       ``required_gpu_count`` (preferred) or num_gpus   0.1
num_replicas   ``num_replicas``                                 omitted (never ``null``)
memory         ``memory`` (preferred) or ``memory_bytes``       omitted (never ``null``)
=============  ===============================================  ==========================

Optional keys are omitted rather than sent as ``null`` because the backend's request models forbid
extra keys and reject nulls. The same :class:`Resources` gives the Ray Serve deployment its
``ray_actor_options`` and ``num_replicas``, so what is dispatched and what is deployed cannot drift.
CPU-only apps must declare ``required_gpu_count: 0``: the 0.1 GPU default would otherwise make them
unschedulable on a cluster without GPUs (the capacity gate says so at dispatch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from totask_ray.serving.config import ReleaseConfig, RequiredResources, ServeOptions

__all__ = [
    "DEFAULT_NUM_CPUS",
    "DEFAULT_NUM_GPUS",
    "DeploymentArgs",
    "Resources",
    "deployment_args",
    "dispatch_payload",
]

DEFAULT_NUM_CPUS = 1
DEFAULT_NUM_GPUS = 0.1


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


class Resources(BaseModel):
    """What each replica reserves, and how many replicas, as dispatched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: int | float = Field(DEFAULT_NUM_CPUS, ge=0)
    num_gpus: int | float = Field(DEFAULT_NUM_GPUS, ge=0)
    num_replicas: int | None = Field(None, ge=1)
    memory: int | None = Field(None, ge=0)

    @classmethod
    def from_required(cls, required: RequiredResources | Mapping[str, Any] | None) -> Resources:
        """Apply the payload table to a release's ``required_resources``."""
        if required is None:
            rr = RequiredResources()
        elif isinstance(required, RequiredResources):
            rr = required
        else:
            rr = RequiredResources.model_validate(dict(required))
        return cls(
            num_cpus=_first(rr.required_cpu_count, rr.num_cpus, DEFAULT_NUM_CPUS),
            num_gpus=_first(rr.required_gpu_count, rr.num_gpus, DEFAULT_NUM_GPUS),
            num_replicas=rr.num_replicas,
            memory=_first(rr.memory, rr.memory_bytes),
        )

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Resources:
        """Read back a dispatch payload (what the agent receives)."""
        return cls.model_validate(dict(payload))

    def to_payload(self) -> dict[str, Any]:
        """The ``params`` of ``POST plugins/{code}/run/`` with ``action: deployment``."""
        payload: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.num_replicas is not None:
            payload["num_replicas"] = self.num_replicas
        if self.memory is not None:
            payload["memory"] = self.memory
        return payload

    def ray_actor_options(self) -> dict[str, Any]:
        """Per-replica reservation for ``@serve.deployment(ray_actor_options=...)``."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            opts["memory"] = self.memory
        return opts

    def bundle(self) -> dict[str, float]:
        """One replica as a Ray resource bundle (zero amounts left out), for the capacity gate."""
        raw = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory or 0}
        return {k: float(v) for k, v in raw.items() if v}

    def fixes_replicas(self, serve_options: ServeOptions | None = None) -> bool:
        """Whether the release fixes its replica count (declared, ``serve_options.num_replicas``, or
        Serve autoscaling); otherwise a run plans it on the cluster's free capacity."""
        if self.num_replicas is not None:
            return True
        return serve_options is not None and (
            serve_options.num_replicas is not None or bool(serve_options.autoscaling_config)
        )

    def replicas(self, serve_options: ServeOptions | None = None) -> int:
        """Declared replicas win; then ``serve_options.num_replicas``; then what an autoscaled app
        starts with (at least one, the replica a first request needs); then one."""
        autoscaled = None
        if serve_options is not None and serve_options.autoscaling_config:
            auto = serve_options.autoscaling_config
            autoscaled = max(1, int(_first(auto.get("initial_replicas"), auto.get("min_replicas"), 1)))
        return _first(self.num_replicas, serve_options.num_replicas if serve_options else None, autoscaled, 1)


class DeploymentArgs(BaseModel):
    """The ``args`` every app's ``build_app(args)`` accepts (Serve's app-builder convention)."""

    model_config = ConfigDict(extra="forbid")

    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": DEFAULT_NUM_CPUS, "num_gpus": DEFAULT_NUM_GPUS}
    )
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    # The app's own constructor options (e.g. ``max_image_bytes``), passed through unchecked.
    options: dict[str, Any] = Field(default_factory=dict)
    # The rest of the SDK's documented serve options, passed to Serve when declared.
    max_queued_requests: int | None = Field(None, ge=-1)
    autoscaling_config: dict[str, Any] | None = None
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, gt=0)
    graceful_shutdown_wait_loop_s: float | None = Field(None, gt=0)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options(...)``."""
        opts: dict[str, Any] = {"ray_actor_options": dict(self.ray_actor_options)}
        if self.autoscaling_config is None:  # Serve refuses a fixed count next to autoscaling
            opts["num_replicas"] = self.num_replicas
        for key in _PASSED_THROUGH:
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        return opts


_PASSED_THROUGH = (
    "max_ongoing_requests",
    "max_queued_requests",
    "autoscaling_config",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
    "graceful_shutdown_wait_loop_s",
)


def dispatch_payload(config: ReleaseConfig) -> dict[str, Any]:
    """The dispatch payload for a release config."""
    return Resources.from_required(config.actions.inference.required_resources).to_payload()


def deployment_args(config: ReleaseConfig, payload: Mapping[str, Any] | None = None) -> DeploymentArgs:
    """``build_app`` args for a release, from whichever action it deploys (``deploy_target``);
    ``payload`` (if given) is what was dispatched."""
    res = (
        Resources.from_payload(payload)
        if payload is not None
        else Resources.from_required(config.actions.inference.required_resources)
    )
    target = config.deploy_target
    serve_options = target.serve_options if target is not None else ServeOptions()
    return DeploymentArgs(
        ray_actor_options=res.ray_actor_options(),
        num_replicas=res.replicas(serve_options),
        max_batch_size=serve_options.batch.max_batch_size,
        batch_wait_timeout_s=serve_options.batch.batch_wait_timeout_s,
        options=dict(target.options) if target is not None else {},
        **{key: getattr(serve_options, key) for key in _PASSED_THROUGH},
    )
