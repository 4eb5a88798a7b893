"""Detect, dispatch, wait: make sure a pre-processor's Ray Serve application is running.

Follows the Synapse ToTask action's PrepareStep (SYN-7005): detect an existing RUNNING app, else
dispatch one, then poll until RUNNING, a terminal failure, or the timeout. Two things are added:

- a capacity gate before dispatch, because a replica the cluster can never place stays DEPLOYING
  forever on Ray 2.60 (the user would only learn it from the timeout, minutes later);
- dispatch never blocks: ``serve.run`` waits without a timeout, so the Ray backend uses
  ``serve.run_many(..., wait_for_applications_running=False)`` and polls ``serve.status()`` itself;
- for a run (``size_replicas``), a replica plan on the same view of the cluster: a release that does
  not fix its replica count gets as many replicas as the free capacity holds next to the run's
  decode actors, and a model that takes ``threads`` gets the free cores the replicas leave
  (:func:`~totask_ray.serving.capacity.plan_replicas`). The plan is gated like a declared count.

The user-facing errors are ``RuntimeError`` with fixed messages that carry only an error type or a
status; the cause stays on ``__cause__`` for logs (no token, URL or stack in the message).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

from totask_ray.platform.base import Agents
from totask_ray.serving.application import serve_application
from totask_ray.serving.capacity import (
    CapacityError,
    CapacityReport,
    ClusterSnapshot,
    NodeType,
    ReplicaPlan,
    Verdict,
    assess,
    holds,
    plan_replicas,
    read_cluster,
)
from totask_ray.serving.config import PreProcessorRelease, ReleaseConfig
from totask_ray.serving.resources import DeploymentArgs, Resources

__all__ = [
    "FAILED_STATUSES",
    "PENDING_STATUSES",
    "LifecycleResult",
    "RayServeBackend",
    "Scaling",
    "ScalingTimeout",
    "ServeApplicationError",
    "ServeBackend",
    "SynapseServeBackend",
    "app_name",
    "autoscaling_for",
    "bind_deployment_class",
    "classify_serve_status",
    "ensure_running",
    "plan_for",
    "route_prefix",
    "teardown",
]

log = logging.getLogger(__name__)

Bucket = Literal["running", "failed", "pending"]
RUNNING = "RUNNING"
FAILED_STATUSES = frozenset({"DEPLOY_FAILED", "UNHEALTHY", "UNAVAILABLE"})
PENDING_STATUSES = frozenset({"NOT_STARTED", "DEPLOYING", "DELETING"})

DISPATCH_FAILED = "Pre-processor deployment dispatch failed ({error_type})"
TERMINAL_STATE = "Pre-processor deployment failed: serve application reached terminal state ({status})"
NOT_READY = "Pre-processor did not become ready within timeout"
SCALING_TIMEOUT = (
    "Pre-processor did not become ready within {waited:.0f} s while the cluster was still adding a node for it; "
    "{name} is left deployed so that the node can still come up (a later run finds it running). "
    "Remove it with `totask-ray serve delete {name}`, or allow more time with node_boot_timeout_s"
)


def app_name(code: str, version: str) -> str:
    return f"{code}@{version}"


def route_prefix(code: str, version: str) -> str:
    return "/" + hashlib.md5(app_name(code, version).encode()).hexdigest()


class ServeApplicationError(Exception):
    """Carries the backend's own message for a failed or stuck app; chained, never shown first."""


@runtime_checkable
class ServeBackend(Protocol):
    """Where Serve applications live: a Ray cluster directly, or a platform agent in front of one.

    ``status`` returns the backend's raw answer (classified by :func:`classify_serve_status`).
    A backend may also offer ``cluster_snapshot() -> ClusterSnapshot | None`` for the capacity gate.
    """

    def status(self, app_name: str) -> Any: ...

    def dispatch(self, release: PreProcessorRelease, payload: Mapping[str, Any]) -> Any: ...

    def delete(self, app_name: str) -> bool: ...


def _status_of(entry: Any) -> str | None:
    value = entry.get("status") if isinstance(entry, Mapping) else entry
    value = getattr(value, "value", value)  # enums
    if isinstance(value, str) and value.strip():
        return value.strip().upper()
    return None


def classify_serve_status(payload: Any) -> tuple[Bucket, str | None]:
    """Fold a status answer into running / failed / pending.

    Accepts a status string, an entry ``{"status": ...}``, a list of entries, or a DRF page
    ``{"results": [...]}``. Any RUNNING wins (multi-replica rollouts are eventually consistent);
    otherwise DEPLOY_FAILED, UNHEALTHY and UNAVAILABLE are terminal; anything else, including an
    empty list or a malformed answer, keeps polling. Returns ``(bucket, status)``; the status is
    ``None`` for running, as in the reference action.
    """
    if isinstance(payload, Mapping) and "results" in payload:
        payload = payload.get("results")
    entries = payload if isinstance(payload, (list, tuple)) else [payload]
    statuses = [s for s in (_status_of(e) for e in entries) if s is not None]
    if RUNNING in statuses:
        return "running", None
    failed = [s for s in statuses if s in FAILED_STATUSES]
    if failed:
        return "failed", failed[0]
    return "pending", (statuses[0] if statuses else None)


@dataclass(frozen=True)
class LifecycleResult:
    """What :func:`ensure_running` found or did. ``started`` decides whether :func:`teardown` deletes."""

    app_name: str
    started: bool
    status: str
    elapsed_s: float
    route_prefix: str = ""
    capacity: CapacityReport | None = None
    plan: ReplicaPlan | None = None


def _as_release(release: PreProcessorRelease | ReleaseConfig) -> PreProcessorRelease:
    return release if isinstance(release, PreProcessorRelease) else PreProcessorRelease.from_config(release)


def _snapshot(backend: Any) -> ClusterSnapshot | None:
    snapshot_fn: Callable[[], ClusterSnapshot | None] | None = getattr(backend, "cluster_snapshot", None)
    try:
        snapshot = snapshot_fn() if snapshot_fn else None
    except Exception as exc:  # the gate is an early warning, not a new way to fail
        log.warning("capacity gate skipped: could not read the cluster (%s)", type(exc).__name__)
        return None
    if snapshot is None:
        log.info("capacity gate skipped: the backend offers no view of the cluster")
    return snapshot


def _local_cores(snapshot: ClusterSnapshot) -> int | None:
    """This machine's cores when it is the cluster's only node (a local run), else None."""
    if len(snapshot.node_ids) != 1:
        return None
    try:
        import ray

        here = ray.get_runtime_context().get_node_id()
    except Exception:
        return None
    return os.cpu_count() if here == snapshot.node_ids[0] else None


def plan_for(
    release: PreProcessorRelease, resources: Resources, snapshot: ClusterSnapshot, *, decode_cpus: float
) -> tuple[ReplicaPlan, Resources]:
    """The replica plan of ``release`` on ``snapshot`` (see :func:`plan_replicas`), and the resources
    to dispatch: a planned count of replicas that left their GPU share to the payload default (0.1)
    get one whole GPU each when the grown cluster has a GPU for each, so that no two share a device."""
    serve_options = release.config.serve_options
    fixed = resources.replicas(serve_options) if resources.fixes_replicas(serve_options) else None
    grown = snapshot.grown()
    widen = False
    if fixed is None and not _declares_gpus(release) and 0 < resources.num_gpus < 1:
        widened = resources.model_copy(update={"num_gpus": 1})
        widen = holds(grown, widened.bundle()) >= 1
        if widen:
            resources = widened
    plan = plan_replicas(
        resources.bundle(),
        snapshot.available,
        fixed=fixed,
        decode_cpus=decode_cpus,
        cores=_local_cores(snapshot),
        grown=grown,
        grown_from=snapshot.describe(),
    )
    plan = replace(plan, gpus_widened=widen)
    if 0 < resources.num_gpus < 1 and plan.max_replicas > 1 and snapshot.grown_total("GPU") >= 2:
        log.warning(
            "%s: %d replicas x %g GPU: Ray packs fractional GPUs, so copies may share one device while the "
            "others idle; declare required_gpu_count: 1 to give each replica a GPU of its own",
            release.app_name, plan.max_replicas, resources.num_gpus,
        )  # fmt: skip
    return plan, resources


def _declares_gpus(release: PreProcessorRelease) -> bool:
    rr = release.config.actions.inference.required_resources
    return rr is not None and (rr.required_gpu_count is not None or rr.num_gpus is not None)


@dataclass(frozen=True)
class Scaling:
    """How a run's planned replicas scale (``None`` on :func:`ensure_running` keeps a fixed count)."""

    keep_warm: bool = False
    target_ongoing: int = 2
    downscale_delay_s: float = 60.0


def autoscaling_for(plan: ReplicaPlan, scaling: Scaling) -> dict:
    """Serve autoscaling for a planned count: start with the plan, grow to what the grown cluster
    holds, and (unless ``keep_warm``) scale to zero once idle so the cluster can release the nodes,
    but not while a run holds the app (`serving.hold`: before its first request too)."""
    from totask_ray.serving.hold import POLICY

    return {
        "min_replicas": plan.replicas if scaling.keep_warm else 0,
        "initial_replicas": plan.replicas,
        "max_replicas": max(plan.replicas, plan.max_replicas),
        "target_ongoing_requests": scaling.target_ongoing,
        "downscale_delay_s": scaling.downscale_delay_s,
        **({} if scaling.keep_warm else {"policy": {"policy_function": POLICY}}),
    }


def _capacity_gate(
    snapshot: ClusterSnapshot | None,
    resources: Resources,
    replicas: int,
    release: PreProcessorRelease,
    node_types: Sequence[NodeType] | None,
) -> CapacityReport | None:
    if snapshot is None:
        return None
    report = assess(resources.bundle(), replicas, snapshot, node_types, name=release.app_name)
    log.info("capacity %s: %s", report.verdict.value, report.message)
    if report.verdict is Verdict.NEVER_FITS:
        raise CapacityError(report)
    return report


class ScalingTimeout(RuntimeError):
    """The wait ended while the cluster was still adding a node for the app: it is left deployed."""


def ensure_running(
    release: PreProcessorRelease | ReleaseConfig,
    backend: ServeBackend,
    *,
    poll_interval_s: float = 1.0,
    timeout_s: float = 180.0,
    check_capacity: bool = True,
    node_types: Sequence[NodeType] | None = None,
    size_replicas: bool = False,
    decode_cpus: float = 0.5,
    scaling: Scaling | None = None,
    node_boot_timeout_s: float = 600.0,
) -> LifecycleResult:
    """Make sure ``release``'s Serve application is RUNNING; dispatch it if it is not.

    ``size_replicas`` (a run): plan the replicas and model threads on the cluster, now and once
    grown, before the gate, leaving room for decode actors of ``decode_cpus`` (see :func:`plan_for`);
    the plan is logged in one line and returned on the result. With ``scaling``, a planned count is
    dispatched with Serve autoscaling (:func:`autoscaling_for`) to a backend that takes it. Without
    ``size_replicas`` (``totask-ray serve deploy``, the platform's agent) the release's count, or
    one, is deployed as before.

    When the gate says the app fits only after the autoscaler adds a node, the wait allows
    ``node_boot_timeout_s`` more for the node to boot, and running out of time then raises
    :class:`ScalingTimeout` with the app left deployed: deleting it would withdraw the request that
    is bringing the node up.

    Raises :class:`~totask_ray.serving.capacity.CapacityError` (a ``RuntimeError``) before dispatch
    when the cluster, even scaled up by ``node_types``, can never hold it; ``RuntimeError`` with the
    reference action's messages on a dispatch error, a terminal state, or the timeout.
    """
    start = time.monotonic()
    rel = _as_release(release)
    name = rel.app_name
    prefix = rel.route_prefix

    try:
        bucket, status = classify_serve_status(backend.status(name))
    except Exception as exc:  # detection is best effort: a failing read means "not known to run"
        log.warning("could not read the status of %s (%s); dispatching", name, type(exc).__name__)
        bucket, status = "pending", None
    if bucket == "running":
        log.info("%s is already running; not redeploying", name)
        return LifecycleResult(name, False, RUNNING, time.monotonic() - start, prefix)

    resources = Resources.from_required(rel.config.actions.inference.required_resources)
    snapshot = _snapshot(backend) if (check_capacity or size_replicas) else None
    plan = None
    autoscaling = None
    if size_replicas and snapshot is not None:
        plan, resources = plan_for(rel, resources, snapshot, decode_cpus=decode_cpus)
        log.info("%s", plan.describe(name))
        if plan.planned:  # dispatched as if declared, so the agent and Serve deploy the same count
            resources = resources.model_copy(update={"num_replicas": plan.replicas})
            if scaling is not None:
                autoscaling = autoscaling_for(plan, scaling)
    replicas = resources.replicas(rel.config.serve_options)
    report = _capacity_gate(snapshot, resources, replicas, rel, node_types) if check_capacity else None
    scaling_up = report is not None and report.verdict is Verdict.FITS_AFTER_SCALING
    if scaling_up:
        timeout_s += node_boot_timeout_s
        log.info("%s: the autoscaler is adding a node for it; waiting up to %.0f s", name, timeout_s)

    payload = resources.to_payload()
    log.info("dispatching %s with %s", name, payload)
    extra: dict[str, Any] = {}
    if plan is not None and plan.threads:
        extra["model_threads"] = plan.threads
    if autoscaling is not None:
        extra["autoscaling_config"] = autoscaling
        log.info("%s scales with Serve: %s", name, autoscaling)
    accepted = inspect.signature(backend.dispatch).parameters
    try:
        backend.dispatch(rel, payload, **{k: v for k, v in extra.items() if k in accepted})
    except Exception as exc:
        raise RuntimeError(DISPATCH_FAILED.format(error_type=type(exc).__name__)) from exc

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = backend.status(name)
            bucket, status = classify_serve_status(last)
        except Exception as exc:  # a transient read error is just another pending poll
            log.debug("status read failed (%s); polling on", type(exc).__name__)
            bucket, status = "pending", None
        if bucket == "running":
            return LifecycleResult(name, True, RUNNING, time.monotonic() - start, prefix, report, plan)
        if bucket == "failed":
            raise RuntimeError(TERMINAL_STATE.format(status=status)) from ServeApplicationError(_detail(last))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            cause = ServeApplicationError(f"last status {status}: {_detail(last)}")
            if scaling_up:
                raise ScalingTimeout(SCALING_TIMEOUT.format(name=name, waited=timeout_s)) from cause
            raise RuntimeError(NOT_READY) from cause
        time.sleep(min(poll_interval_s, remaining))


def _detail(raw: Any) -> str:
    """The backend's own message (e.g. Serve's traceback of a failing constructor), for __cause__."""
    entries = raw if isinstance(raw, (list, tuple)) else [raw]
    parts = []
    for e in entries:
        if isinstance(e, Mapping):
            parts.append(str(e.get("message") or ""))
            for dep, info in (e.get("deployments") or {}).items():
                if isinstance(info, Mapping) and info.get("message"):
                    parts.append(f"{dep}: {info['message']}")
    return "\n".join(p for p in parts if p) or "no message from the backend"


def teardown(result: LifecycleResult, backend: ServeBackend) -> bool:
    """Delete the app only if this run started it; an app that was already running is left alone."""
    if not result.started:
        return False
    return bool(backend.delete(result.app_name))


def bind_deployment_class(entry: Any, args: DeploymentArgs, *, batch: bool = False) -> Any:
    """A Serve application from a deployment class, the SDK's way (``actions.inference.entrypoint``).

    As ``BaseDeploymentAction.deploy`` does: ``serve.ingress`` for a class with a FastAPI ``app``,
    ``@serve.batch`` on ``infer_batch`` only when the release writes ``serve_options.batch`` (on a
    subclass, so the app's class is not changed), the release's serve options, and ``backend_url``
    from the run's environment for a class that takes one (the SDK's ``BaseServeDeployment`` fetches
    models from there). ``args.options`` are the other constructor arguments.
    """
    from ray import serve

    decorated = isinstance(entry, serve.Deployment)
    cls = entry.func_or_class if decorated else entry
    # Read before wrapping: serve.ingress's wrapper takes (*args, **kwargs).
    takes_backend_url = "backend_url" in inspect.signature(cls).parameters
    if not decorated and getattr(cls, "app", None) is not None:
        cls = serve.ingress(cls.app)(cls)
    if batch and hasattr(cls, "infer_batch"):
        batched = serve.batch(
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s
        )(cls.infer_batch)
        cls = type(f"{cls.__name__}_Batched", (cls,), {"infer_batch": batched})
    # The deployment keeps the name of the class the release names, whatever wraps it.
    name = entry.name if decorated else entry.__name__
    deployment = (
        entry.options(func_or_class=cls, name=name) if decorated else serve.deployment(cls, name=name)
    )
    kwargs = dict(args.options)
    if takes_backend_url and "backend_url" not in kwargs:
        kwargs["backend_url"] = os.environ.get("SYNAPSE_PLUGIN_RUN_HOST") or os.environ.get(
            "SYNAPSE_HOST", ""
        )
    return deployment.options(**args.deployment_options()).bind(**kwargs)


class RayServeBackend:
    """Deploy straight onto the connected Ray cluster (``ray.init`` first, or pass ``address``)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        http_options: Mapping[str, Any] | None = None,
        delete_timeout_s: float = 60.0,
        node_types: Sequence[NodeType] | None = None,
    ) -> None:
        self.address = address
        self.http_options = dict(http_options) if http_options else None
        self.delete_timeout_s = delete_timeout_s
        self.node_types = list(node_types) if node_types is not None else None

    def _connect(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address or "auto", log_to_driver=False, logging_level=logging.WARNING)

    def status(self, app_name: str) -> list[dict[str, Any]]:
        from ray import serve

        self._connect()
        app = serve.status().applications.get(app_name)
        if app is None:
            return []
        deployments = {
            dep_name: {
                "status": getattr(dep.status, "value", str(dep.status)),
                "message": dep.message,
                "replica_states": {
                    getattr(k, "value", str(k)): v for k, v in (dep.replica_states or {}).items()
                },
            }
            for dep_name, dep in app.deployments.items()
        }
        return [
            {
                "name": app_name,
                "status": getattr(app.status, "value", str(app.status)),
                "message": app.message,
                "deployments": deployments,
            }
        ]

    def list_applications(self) -> dict[str, str]:
        """``{app name: status}`` of every Serve application on the cluster."""
        from ray import serve

        self._connect()
        return {n: getattr(a.status, "value", str(a.status)) for n, a in serve.status().applications.items()}

    def cluster_snapshot(self) -> ClusterSnapshot:
        self._connect()
        return read_cluster(self.node_types)

    def dispatch(
        self,
        release: PreProcessorRelease,
        payload: Mapping[str, Any],
        *,
        model_threads: int | None = None,
        autoscaling_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Deploy ``release`` with ``payload``'s resources; ``model_threads`` (a run's plan) goes to
        an app built on ``serving.deployment`` whose model takes ``threads`` and whose options do not
        set them (any other app is deployed as it is); ``autoscaling_config`` (a run's planned count)
        replaces the fixed count."""
        from ray import serve

        self._connect()
        # The one description of the app that `totask-ray serve config` prints too, so they cannot drift.
        spec = serve_application(release, payload, autoscaling_config=autoscaling_config)
        app = spec.build()
        if model_threads and "threads" not in spec.args.get("options", {}) and _model_takes_threads(app):
            spec = spec.with_model_options(threads=model_threads)
            app = spec.build()
            log.info("%s: %d model threads per replica", release.app_name, model_threads)
        if self.http_options is not None:
            serve.start(http_options=self.http_options)
        serve.run_many(
            [
                serve.RunTarget(
                    target=app,
                    name=spec.name,
                    route_prefix=spec.route_prefix,
                    logging_config=spec.logging_config,
                )
            ],
            wait_for_applications_running=False,
        )

    def delete(self, app_name: str) -> bool:
        """Ask Serve to delete the app and wait (bounded) until it is gone; False if it never existed."""
        from ray import serve

        self._connect()
        if app_name not in serve.status().applications:
            return False
        serve.delete(app_name, _blocking=False)
        deadline = time.monotonic() + self.delete_timeout_s
        while time.monotonic() < deadline:
            if app_name not in serve.status().applications:
                return True
            time.sleep(0.2)
        log.warning("%s still deleting after %.0f s", app_name, self.delete_timeout_s)
        return True


def _model_takes_threads(app: Any) -> bool:
    """Whether a built app is ``serving.deployment``'s shape (``(model_cls, ..., options=...)``) around a
    model whose constructor takes ``threads``."""
    bound = getattr(app, "_bound_deployment", None)
    args, kwargs = getattr(bound, "init_args", ()), getattr(bound, "init_kwargs", {})
    if not args or not callable(args[0]) or "options" not in (kwargs or {}):
        return False
    try:
        return "threads" in inspect.signature(args[0]).parameters
    except (TypeError, ValueError):
        return False


def _names_other_version(row: Any, app_name: str, version: str) -> bool:
    if not isinstance(row, Mapping):
        return False
    name, row_version = row.get("name"), row.get("version")
    if isinstance(name, str) and "@" in name and name != app_name:
        return True
    return isinstance(row_version, str) and row_version != version


class SynapseServeBackend:
    """Go through the platform: its agent deploys onto its own Ray cluster.

    ``client`` is the platform's `Agents` (``list_serve_applications``, ``run_plugin``);
    ``delete_serve_application(app_name, agent=...)`` is used if it exists (the Synapse contract has
    no delete endpoint).
    """

    def __init__(self, client: Agents, agent: int | str) -> None:
        self.client = client
        self.agent = agent

    def status(self, app_name: str) -> Any:
        """The plugin's apps on this agent, minus those that name another version.

        The listing is per plugin code; the reference action reads every row's status, so a RUNNING
        1.0.0 would pass for 1.1.0. Rows that say which version they are (``version`` or a
        ``code@version`` ``name``) are kept only for this version; rows that do not are kept.
        """
        code, _, version = app_name.rpartition("@")
        raw = self.client.list_serve_applications(plugin_code=code, agent=self.agent)
        rows = raw.get("results") if isinstance(raw, Mapping) and "results" in raw else raw
        if not isinstance(rows, (list, tuple)):
            return raw
        return [r for r in rows if not _names_other_version(r, app_name, version)]

    def dispatch(self, release: PreProcessorRelease, payload: Mapping[str, Any]) -> Any:
        # The reference client's body plus `version` (an accepted key of plugins/{code}/run/), so the
        # agent deploys this release and not whichever it takes as the latest. The client adds
        # `language`.
        body = {
            "agent": self.agent,
            "action": "deployment",
            "params": dict(payload),
            "version": release.version,
        }
        return self.client.run_plugin(release.code, body)

    def delete(self, app_name: str) -> bool:
        deleter = getattr(self.client, "delete_serve_application", None)
        if deleter is None:
            log.info("the platform offers no way to delete %s; leaving it", app_name)
            return False
        deleter(app_name, agent=self.agent)
        return True
