"""The inference method's prepare: bring up the pre-processor the job names, or refuse the run.

Prepare resolves `pre_processor` (a plugin release id) on the platform, parses its config with
strict models, and runs the lifecycle (detect → capacity gate → dispatch → wait) on the Ray
cluster. A pre-processor this run started is torn down if the run then fails critically; one that
was already running is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from totask_ray.cluster import ensure_ray
from totask_ray.errors import CriticalError
from totask_ray.methods.base import AnnotationMethod, PrepareInput
from totask_ray.methods.inference.annotator import InferenceAnnotator
from totask_ray.methods.inference.release import app_spec, synapse_route
from totask_ray.methods.labels import LabelMapError, LabelMapping
from totask_ray.pipeline.run import AnnotatorSpec
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.errors import NotFoundError

if TYPE_CHECKING:
    from totask_ray.serving.config import PreProcessorRelease
    from totask_ray.serving.hold import Lease

log = logging.getLogger("totask_ray")


@dataclass
class InferencePlan:
    release: PreProcessorRelease
    config: dict[str, Any]
    params: dict[str, Any]  # the job's pre_processor_params as checked (aliases resolved, unknown out)
    convention: str = "batched"
    route: str | None = None
    body_model: str | None = None
    labels: LabelMapping | None = None
    # batched: what a call carries, the files' bytes or decoded arrays (`PreProcessorSpec.payload`)
    payload: str = "encoded"

    @property
    def app_name(self) -> str:
        return self.release.app_name


class InferenceMethod(AnnotationMethod):
    """Prepare: resolve the release, bring the pre-processor up. Annotator: `InferenceAnnotator`."""

    name = "inference"

    def __init__(self, spec: RunSpec) -> None:
        self.options = spec.options
        self.plan: InferencePlan | None = None
        self._backend: Any = None
        self._dispatched: str | None = None
        self._reserved_cpus = 0.0
        self._hold: Lease | None = None

    def prepare(self, job: PrepareInput) -> None:
        from totask_ray.pipeline.run import IN_FLIGHT_PER_ACTOR
        from totask_ray.serving.capacity import CapacityError
        from totask_ray.serving.config import PreProcessorRelease, ReleaseConfigError, parse_release_config
        from totask_ray.serving.lifecycle import RayServeBackend, Scaling, ScalingTimeout, ensure_running

        release_id = job.params.pre_processor
        assert release_id is not None, "ToTaskParams requires pre_processor for the inference method"
        try:
            raw = job.platform.get_plugin_release(release_id)
        except NotFoundError:
            raise CriticalError(
                f"Pre-processor not found: plugin release {release_id} does not exist or this token cannot see it"
            ) from None
        try:
            config = parse_release_config(raw.config, source=f"plugin release {release_id}")
        except ReleaseConfigError as exc:
            raise CriticalError(f"Pre-processor not active: its release config is invalid: {exc}") from None
        release = PreProcessorRelease.from_config(config, id=raw.id)
        o = self.options
        convention = o.inference_convention or release.convention
        if release.requires_model and job.params.model is None:
            raise CriticalError(
                f"Pre-processor needs a model: release {release_id} ({release.app_name}) picks its model by "
                "`model`; set model to the model's id"
            )
        ensure_ray(o.ray_address, verbose=o.verbose_ray)
        spec = app_spec(release)
        from totask_ray.serving.resources import Resources

        declared = o.declared_node_types()
        reserved = Resources.from_required(release.config.actions.inference.required_resources).num_gpus
        checked_params = check_job_params(spec, job.params.pre_processor_params, reserved, declared)
        try:
            labels = LabelMapping.build(
                job.project.classes,
                sorted(set(spec.labels.values())) if spec is not None else None,
                job.params.label_map,
                job.params.unmapped_labels,
            )
        except LabelMapError as exc:
            raise CriticalError(f"Labels do not map to the project: {exc}") from None
        route, body_model = synapse_route(release) if convention == "synapse" else (None, None)
        backend = self._backend = RayServeBackend(node_types=declared)
        scaling = Scaling(
            keep_warm=o.keep_warm, target_ongoing=IN_FLIGHT_PER_ACTOR, downscale_delay_s=o.scale_down_delay_s
        )
        if not o.keep_warm:  # held before they run: Serve counts their idleness from then
            self._hold = hold(release.app_name)
        try:
            result = ensure_running(
                release, backend, poll_interval_s=o.serve_poll_interval_s, timeout_s=o.serve_ready_timeout_s,
                size_replicas=True, decode_cpus=o.actor_cpus, scaling=scaling,
                node_boot_timeout_s=o.node_boot_timeout_s,
            )  # fmt: skip
        except CapacityError as exc:  # refused before dispatch: nothing to undo
            raise CriticalError(f"Pre-processor not active: {exc}") from exc
        except ScalingTimeout as exc:  # left deployed: the node it asked for may be on its way
            raise CriticalError(f"Pre-processor not active: {exc}") from exc
        except RuntimeError as exc:  # dispatched (or tried to), then failed: this run owns what is there
            self._dispatched = release.app_name
            raise CriticalError(f"Pre-processor not active: {exc}") from exc
        if result.started:
            self._dispatched = release.app_name
        elif self._hold is not None:  # found running, maybe scaled to zero by an earlier run
            self._wake(release.app_name, o.serve_ready_timeout_s + o.node_boot_timeout_s)
        self._reserved_cpus = _replica_cpus(result.plan)
        self.plan = InferencePlan(
            release,
            config.model_dump(mode="json", exclude_none=True),
            checked_params,
            convention=convention,
            route=route,
            body_model=body_model,
            labels=labels,
            payload=payload_of(spec),
        )
        verb = "started" if result.started else "found running"
        log.info("pre-processor %s %s (%.1f s)", release.app_name, verb, result.elapsed_s)

    def rollback(self) -> None:
        """Delete a pre-processor this run dispatched; one that was already running is left alone."""
        if self._dispatched is not None and self._backend is not None:
            log.info("tearing down %s, which this run dispatched", self._dispatched)
            self._backend.delete(self._dispatched)
            self._dispatched = None

    @staticmethod
    def _wake(app_name: str, timeout_s: float) -> None:
        from totask_ray.serving.hold import wake

        try:
            woke = wake(app_name, timeout_s)
        except Exception as exc:  # Serve's details unreadable: the first batch wakes it, as before
            log.debug("could not look at %s's replicas: %s", app_name, type(exc).__name__)
            return
        if woke is False:
            log.warning(
                "%s has no replica running after %.0f s; the run goes on and waits for one",
                app_name,
                timeout_s,
            )

    def close(self) -> None:
        """Give up the run's hold on the replicas: Serve scales them down once idle from here."""
        if self._hold is not None:
            self._hold.release()
            self._hold = None

    def annotator(self, spec: RunSpec, stop_flag: Any = None) -> AnnotatorSpec:
        assert self.plan is not None, "prepare() runs before annotator()"
        return AnnotatorSpec(
            InferenceAnnotator,
            {
                "spec": spec,
                "stop_flag": stop_flag,
                "app_name": self.plan.app_name,
                "pre_processor_config": self.plan.config,
                "convention": self.plan.convention,
                "route": self.plan.route,
                "body_model": self.plan.body_model,
                "labels": self.plan.labels,
                "app_params": self.plan.params,
                "payload": self.plan.payload,
                "release": {
                    "code": self.plan.release.code,
                    "version": self.plan.release.version,
                    "config": self.plan.config,
                    "max_batch_size": self.plan.release.max_batch_size,
                },
            },
            reserved_cpus=self._reserved_cpus,
        )


def hold(app_name: str) -> Lease | None:
    """The run's lease on the app (`serving.hold`), or None where it cannot be put: the run goes on,
    with the replicas scaling down whenever they idle, as Serve alone would."""
    from totask_ray.serving.hold import Lease

    try:
        return Lease(app_name).take()
    except Exception as exc:
        log.warning(
            "could not hold %s for the run (%s): it may scale down while idle", app_name, type(exc).__name__
        )
        return None


def payload_of(spec: Any) -> str:
    """What a batched call carries to the app: the files' bytes, decoded on the replica, where the
    app is built on the pre-processor contract (its module declares a `PreProcessorSpec`: the shared
    deployment decodes), unless that spec asks for arrays; decoded arrays for an app with no spec,
    whose own `predict` may expect them."""
    return spec.payload if spec is not None else "decoded"


def _replica_cpus(plan: Any) -> float:
    """CPUs the planned replicas hold at their most (the annotator pool leaves them)."""
    if plan is None:
        return 0.0
    return plan.bundle.get("CPU", 0.0) * max(plan.replicas, plan.max_replicas)


def cluster_gpus(declared: Any = None) -> float:
    """The GPUs the cluster has or its autoscaler can add (a GPU pool may start at zero nodes)."""
    from totask_ray.serving.capacity import read_cluster

    return read_cluster(declared).grown_total("GPU")


def check_job_params(
    spec: Any, params: dict[str, Any], gpus_per_replica: float | None, declared: Any = None
) -> dict[str, Any]:
    """`pre_processor_params` checked against what the app declares, before anything is deployed:
    a bad value is a critical error naming the field; unknown keys get one warning."""
    from totask_ray.serving.params_check import ParamsRefused, check_params

    try:
        checked = check_params(
            spec, params, gpus_available=cluster_gpus(declared), gpus_per_replica=gpus_per_replica
        )
    except ParamsRefused as exc:
        raise CriticalError(f"Invalid pre_processor_params: {exc}") from None
    if checked.ignored:
        log.warning(
            "pre_processor_params: %s not used by this pre-processor (ignored): %s",
            "this key is" if len(checked.ignored) == 1 else "these keys are",
            ", ".join(sorted(checked.ignored)),
        )
    return dict(checked.params)
