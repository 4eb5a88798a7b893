"""What the cluster can grow to: the autoscaler's node types, wherever they can be read.

A run sizes its pools and replicas on the nodes the autoscaler could add, not only on the nodes up
this second, so it needs each node type's resources and its most workers. Ray 2.60 has three places
that say so, tried in this order by :func:`discover_node_types`:

- the GCS cluster config (``state.get_cluster_config()``), written by autoscaler v2 (KubeRay's);
- the config file the head's autoscaler monitor was started with. Measured here on Ray 2.60's
  fake multi-node autoscaler: the v1 monitor (the cluster launcher's, ``ray up``) writes no cluster
  config to the GCS, but its status key (``__autoscaling_status``) names its process id, and its
  command line names the file (``--autoscaling-config=~/ray_bootstrap_config.yaml`` under ``ray
  up``). A driver on the head (``ray job submit`` runs drivers there) reads that file;
- node types the user declares (``--cluster-yaml``), which win over both when given.

The same status key counts the nodes of each type that are up (``active_nodes``), so the headroom
is each type's most workers minus those already running.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATUS_KEY = "__autoscaling_status"
_MONITOR_FLAG = "--autoscaling-config="
_UNBOUNDED = 1 << 20


@dataclass(frozen=True)
class NodeType:
    """A node group the autoscaler may launch: each node's resources and how many at most."""

    name: str
    resources: Mapping[str, float]
    max_workers: int
    min_workers: int = 0


@dataclass(frozen=True)
class DiscoveredTypes:
    """Node types and where they were read (for the plan's log line); ``types`` is None when no
    source had any (a plain local cluster, or a driver off the head of a v1 autoscaler)."""

    types: tuple[NodeType, ...] | None
    source: str
    running: Mapping[str, int]


def node_types_from_cluster_yaml(source: str | Path | Mapping[str, Any]) -> list[NodeType]:
    """Node types declared in a Ray cluster launcher config (``available_node_types``), or in a
    KubeRay ``RayCluster`` manifest (see :func:`node_types_from_raycluster`).

    The head node type is counted with its ``max_workers`` (usually 0): it is already running, so
    it is in the alive nodes. Per-type counts are capped by the top-level ``max_workers``.
    """
    if isinstance(source, Mapping):
        config: Mapping[str, Any] = source
    else:
        import yaml

        config = yaml.safe_load(Path(source).expanduser().read_text(encoding="utf-8")) or {}
    if config.get("kind") == "RayCluster":
        return node_types_from_raycluster(config)
    cap = config.get("max_workers")
    head = config.get("head_node_type")
    out: list[NodeType] = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
        max_workers = 0 if name == head else int(spec.get("max_workers", 0))
        if cap is not None:
            max_workers = min(max_workers, int(cap))
        out.append(NodeType(str(name), resources, max_workers, int(spec.get("min_workers", 0))))
    return out


def _quantity(value: Any) -> float:
    """A Kubernetes quantity as a number: ``"8"``, ``"500m"`` (0.5), ``2``."""
    text = str(value).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def node_types_from_raycluster(manifest: Mapping[str, Any]) -> list[NodeType]:
    """The worker groups of a KubeRay ``RayCluster`` (``spec.workerGroupSpecs``): each group's
    ``maxReplicas``, and its CPUs and GPUs as Ray sees them: ``rayStartParams`` ``num-cpus`` /
    ``num-gpus`` when set, else the Ray container's ``resources.limits`` (``cpu``,
    ``nvidia.com/gpu``), which is what KubeRay passes to ``ray start``."""
    spec = manifest.get("spec") or {}
    out: list[NodeType] = []
    for group in spec.get("workerGroupSpecs") or ():
        params = group.get("rayStartParams") or {}
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        resources: dict[str, float] = {}
        cpus = params.get("num-cpus", limits.get("cpu"))
        gpus = params.get("num-gpus", limits.get("nvidia.com/gpu"))
        if cpus is not None:
            resources["CPU"] = _quantity(cpus)
        if gpus is not None and _quantity(gpus) > 0:
            resources["GPU"] = _quantity(gpus)
        replicas = group.get("maxReplicas", group.get("replicas", 0))
        out.append(
            NodeType(
                str(group.get("groupName", "workers")),
                resources,
                int(replicas),
                int(group.get("minReplicas", 0)),
            )
        )
    return out


def node_types_from_cluster_config(config: Any) -> list[NodeType] | None:
    """Node types from the GCS autoscaler ``ClusterConfig`` protobuf (``None`` when there is none)."""
    if config is None:
        return None
    out: list[NodeType] = []
    for group in config.node_group_configs:
        max_count = int(group.max_count)
        out.append(
            NodeType(
                name=str(group.name),
                resources={str(k): float(v) for k, v in group.resources.items()},
                max_workers=_UNBOUNDED if max_count < 0 else max_count,
                min_workers=int(group.min_count),
            )
        )
    return out


def autoscaler_status() -> dict[str, Any]:
    """The v1 autoscaler's status (empty when no autoscaler runs or it has not reported yet)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return {}
    raw = _internal_kv_get(STATUS_KEY)
    try:
        status = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def running_by_type(status: Mapping[str, Any]) -> dict[str, int]:
    """Nodes of each type that are up, from the autoscaler's status (empty when unknown)."""
    report = status.get("autoscaler_report") or {}
    active = report.get("active_nodes") or {}
    idle = report.get("idle_nodes") or {}
    out: dict[str, int] = {}
    for counts in (active, idle):
        if isinstance(counts, Mapping):
            for name, n in counts.items():
                out[str(name)] = out.get(str(name), 0) + int(n)
    return out


def local_monitor(status: Mapping[str, Any], gcs_address: str | None) -> list[str] | None:
    """The command line of this cluster's autoscaler monitor when it runs on this machine (its
    ``--gcs-address`` ends in this cluster's port); None when it runs elsewhere or is gone."""
    import psutil

    pid = status.get("monitor_pid")
    if not isinstance(pid, int):
        return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return None  # another machine's process (a driver off the head, a KubeRay sidecar), or gone
    if not any("monitor.py" in part for part in cmdline):
        return None
    port = (gcs_address or "").rpartition(":")[2]
    if port and not any(part.startswith("--gcs-address") and part.endswith(f":{port}") for part in cmdline):
        return None
    return cmdline


def monitor_config_path(cmdline: Sequence[str] | None) -> Path | None:
    """The autoscaling config file a monitor's command line names, if any."""
    for part in cmdline or ():
        if part.startswith(_MONITOR_FLAG):
            return Path(part[len(_MONITOR_FLAG) :]).expanduser()
    return None


def discover_node_types(declared: list[NodeType] | None = None) -> DiscoveredTypes:
    """The cluster's node types, from the user's declaration or the cluster (see the module doc)."""
    import ray
    from ray._private import state

    status = autoscaler_status()
    running = running_by_type(status)
    if declared is not None:
        return DiscoveredTypes(tuple(declared), "declared (--cluster-yaml)", running)
    try:
        from_gcs = node_types_from_cluster_config(state.state.get_cluster_config())
    except Exception:  # an older GCS without the key, or no permission
        from_gcs = None
    if from_gcs:
        return DiscoveredTypes(tuple(from_gcs), "the autoscaler's cluster config", running)
    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:
        gcs = None
    monitor = local_monitor(status, gcs)
    path = monitor_config_path(monitor)
    if path is not None:
        try:
            return DiscoveredTypes(
                tuple(node_types_from_cluster_yaml(path)), f"the autoscaler's config {path}", running
            )
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("could not read the autoscaler's config %s (%s)", path, type(exc).__name__)
    if monitor is not None:  # the head's monitor runs here with no autoscaling config: a static cluster
        return DiscoveredTypes(None, "no autoscaler", running)
    if status.get("autoscaler_report"):
        return DiscoveredTypes(
            None, "an autoscaler runs but its node types are unknown here: pass --cluster-yaml", running
        )
    return DiscoveredTypes(None, "no autoscaler", running)
