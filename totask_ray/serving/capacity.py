"""Can the cluster ever hold this pre-processor? Answer before dispatch, not after minutes of silence.

Measured on Ray 2.60: a deployment that asks for more than any node has stays ``DEPLOYING`` forever
and ``serve.run`` waits with it. So, before dispatching, place ``num_replicas`` copies of one replica's
bundle first-fit onto nodes (a replica must fit on ONE node: cluster totals are not enough):

- on what the alive nodes have free now          -> ``fits_now``
- on the alive nodes' totals                      -> ``busy`` (it will wait for running work)
- on the totals plus nodes the autoscaler may add -> ``fits_after_scaling``
- nowhere                                         -> ``never_fits``: :class:`CapacityError` at dispatch

The placement logic works on plain dicts (:func:`assess`); reading a live cluster is separate
(:func:`read_cluster`), so the verdicts are unit-testable without Ray.

:func:`plan_replicas` sizes a run's pre-processor on the same dicts: as many replicas as the free
resources hold next to the decode actors that feed them (when the release does not fix the count),
and the model threads each replica may run (see its docstring for the measured choice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "CapacityError",
    "CapacityReport",
    "ClusterSnapshot",
    "NodeType",
    "ReplicaPlan",
    "Verdict",
    "assess",
    "check_capacity",
    "max_replicas",
    "node_types_from_cluster_config",
    "node_types_from_cluster_yaml",
    "pack",
    "plan_replicas",
    "read_cluster",
]

# Ray keeps resources in fixed point with 4 decimals; compare with a little slack.
_EPS = 1e-6
# Replicas a run plans at most (a release that wants more fixes num_replicas or autoscaling).
MAX_PLANNED_REPLICAS = 16
_GiB = 1024**3


class Verdict(StrEnum):
    FITS_NOW = "fits_now"
    BUSY = "busy"
    FITS_AFTER_SCALING = "fits_after_scaling"
    NEVER_FITS = "never_fits"


@dataclass(frozen=True)
class NodeType:
    """A node group the autoscaler may launch: each node's resources and how many at most."""

    name: str
    resources: Mapping[str, float]
    max_workers: int
    min_workers: int = 0


@dataclass(frozen=True)
class ClusterSnapshot:
    """Per-node totals and free resources of the alive nodes, and the autoscaler's node types.

    ``node_types`` is ``None`` when no autoscaler reported a cluster config (a plain local cluster).
    """

    totals: Sequence[Mapping[str, float]]
    available: Sequence[Mapping[str, float]]
    node_types: Sequence[NodeType] | None = None
    node_ids: Sequence[str] = ()


@dataclass(frozen=True)
class CapacityReport:
    verdict: Verdict
    bundle: Mapping[str, float]
    replicas: int
    message: str
    node_types: Sequence[NodeType] = field(default_factory=tuple)


class CapacityError(RuntimeError):
    """The cluster, even fully scaled, can never hold the pre-processor."""

    def __init__(self, report: CapacityReport) -> None:
        super().__init__(report.message)
        self.report = report


def _fits(free: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in bundle.items() if v > 0)


def pack(bundle: Mapping[str, float], replicas: int, nodes: Iterable[Mapping[str, float]]) -> int:
    """First-fit ``replicas`` copies of ``bundle`` onto ``nodes``; return how many were placed."""
    free = [dict(n) for n in nodes]
    placed = 0
    for _ in range(replicas):
        for node in free:
            if _fits(node, bundle):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                placed += 1
                break
        else:
            break
    return placed


def max_replicas(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many replicas one node can hold (an empty bundle counts as unbounded -> a large number)."""
    counts = [math.floor((node.get(k, 0.0) + _EPS) / v) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 1 << 30


def _scaled_nodes(node_types: Sequence[NodeType], replicas: int) -> list[Mapping[str, float]]:
    # Upper bound: up to max_workers new nodes per type (more than `replicas` never helps). Nodes of a
    # type already running are not subtracted because Ray does not label nodes with their type.
    nodes: list[Mapping[str, float]] = []
    for nt in node_types:
        nodes.extend([nt.resources] * max(0, min(nt.max_workers, replicas)))
    return nodes


def _amount(resource: str, amount: float) -> str:
    return f"{amount / _GiB:.3g} GiB" if resource.endswith("memory") else f"{amount:g}"


def _fmt(resource: str, amount: float) -> str:
    return f"{resource} {_amount(resource, amount)}"


def _never_fits_message(
    bundle: Mapping[str, float],
    replicas: int,
    totals: Sequence[Mapping[str, float]],
    node_types: Sequence[NodeType],
    name: str | None,
) -> str:
    who = f"pre-processor {name}" if name else "pre-processor"
    scaled = _scaled_nodes(node_types, replicas)
    short: list[str] = []
    for res, need in bundle.items():
        if need <= 0:
            continue
        holdable = sum(max_replicas({res: need}, n) for n in [*totals, *scaled])
        if holdable >= replicas:
            continue
        have = sum(n.get(res, 0.0) for n in totals)
        largest = max((n.get(res, 0.0) for n in totals), default=0.0)
        text = f"{who} needs {_fmt(res, need)} x {replicas} replica{'s' if replicas != 1 else ''}"
        text += f"; the cluster has {_fmt(res, have)}"
        if largest < have - _EPS:
            text += f" (at most {_amount(res, largest)} on one node)"
        types_with = [
            nt for nt in node_types if nt.resources.get(res, 0.0) >= need - _EPS and nt.max_workers > 0
        ]
        if not types_with:
            text += " and its node types add none"
        else:
            add = ", ".join(
                f"{nt.name}: up to {nt.max_workers} x {_fmt(res, nt.resources[res])}" for nt in types_with
            )
            text += f" and its node types add too few ({add})"
        if res == "GPU" and abs(need - 0.1) < _EPS:
            text += " (0.1 GPU is the payload default: a CPU-only app must declare required_gpu_count: 0)"
        short.append(text)
    if not short:
        need = " + ".join(_fmt(k, v) for k, v in bundle.items() if v > 0)
        short.append(
            f"{who} needs {need} on one node x {replicas} replica{'s' if replicas != 1 else ''}; "
            "no node (nor any node type) offers all of it together"
        )
    return (
        "; ".join(short) + ". A replica must fit on one node: lower actions.inference.required_resources "
        "(required_cpu_count / required_gpu_count / memory / num_replicas) or add a node type that fits."
    )


def assess(
    bundle: Mapping[str, float],
    replicas: int,
    snapshot: ClusterSnapshot,
    node_types: Sequence[NodeType] | None = None,
    *,
    name: str | None = None,
) -> CapacityReport:
    """The verdict for ``replicas`` x ``bundle`` on ``snapshot``.

    ``node_types`` are the user's declared node types (e.g. from cluster.yaml); they are added to any
    the autoscaler reported in ``snapshot.node_types``. ``name`` (the app) goes into the message.
    """
    bundle = {k: float(v) for k, v in bundle.items() if v}
    types = [*(snapshot.node_types or ()), *(node_types or ())]
    summary = " + ".join(_fmt(k, v) for k, v in bundle.items()) or "nothing"
    plural = "s" if replicas != 1 else ""
    if pack(bundle, replicas, snapshot.available) >= replicas:
        return CapacityReport(
            Verdict.FITS_NOW,
            bundle,
            replicas,
            f"fits now: {replicas} replica{plural} x {summary}",
            tuple(types),
        )
    if pack(bundle, replicas, snapshot.totals) >= replicas:
        return CapacityReport(
            Verdict.BUSY,
            bundle,
            replicas,
            f"busy: {replicas} replica{plural} x {summary} fit the cluster's nodes but not what is free now; "
            "replicas will start when running work releases resources",
            tuple(types),
        )
    if types and pack(bundle, replicas, [*snapshot.totals, *_scaled_nodes(types, replicas)]) >= replicas:
        usable = sorted({nt.name for nt in types if max_replicas(bundle, nt.resources) > 0})
        return CapacityReport(
            Verdict.FITS_AFTER_SCALING,
            bundle,
            replicas,
            f"fits after scaling: {replicas} replica{plural} x {summary} need nodes the autoscaler may add "
            f"({', '.join(usable)})",
            tuple(types),
        )
    return CapacityReport(
        Verdict.NEVER_FITS,
        bundle,
        replicas,
        _never_fits_message(bundle, replicas, snapshot.totals, types, name),
        tuple(types),
    )


def check_capacity(
    bundle: Mapping[str, float],
    replicas: int,
    snapshot: ClusterSnapshot,
    node_types: Sequence[NodeType] | None = None,
    *,
    name: str | None = None,
) -> CapacityReport:
    """:func:`assess`, raising :class:`CapacityError` on ``never_fits``."""
    report = assess(bundle, replicas, snapshot, node_types, name=name)
    if report.verdict is Verdict.NEVER_FITS:
        raise CapacityError(report)
    return report


def node_types_from_cluster_yaml(source: str | Path | Mapping[str, Any]) -> list[NodeType]:
    """Node types declared in a Ray cluster launcher config (``available_node_types``).

    The head node type is counted with its ``max_workers`` (usually 0): it is already running, so
    it is in the alive nodes. Per-type counts are capped by the top-level ``max_workers``.
    """
    if isinstance(source, Mapping):
        config: Mapping[str, Any] = source
    else:
        import yaml

        config = yaml.safe_load(Path(source).read_text(encoding="utf-8")) or {}
    cap = config.get("max_workers")
    out: list[NodeType] = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
        max_workers = int(spec.get("max_workers", 0))
        if cap is not None:
            max_workers = min(max_workers, int(cap))
        out.append(NodeType(str(name), resources, max_workers, int(spec.get("min_workers", 0))))
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
                max_workers=(1 << 20) if max_count < 0 else max_count,
                min_workers=int(group.min_count),
            )
        )
    return out


def read_cluster() -> ClusterSnapshot:
    """Snapshot the connected Ray cluster (``ray.init`` must have been called)."""
    from ray._private import state

    totals = state.total_resources_per_node()
    available = state.available_resources_per_node()
    node_ids = sorted(totals)
    try:
        node_types = node_types_from_cluster_config(state.state.get_cluster_config())
    except Exception:  # an older GCS without the key, or no permission: treat as no autoscaler
        node_types = None
    return ClusterSnapshot(
        totals=[dict(totals[n]) for n in node_ids],
        available=[dict(available.get(n, {})) for n in node_ids],
        node_types=node_types,
        node_ids=[str(n) for n in node_ids],
    )


@dataclass(frozen=True)
class ReplicaPlan:
    """How a run deploys its pre-processor: replicas, each one's bundle, its model threads.

    ``planned`` is False when the release fixed the count (``num_replicas``, or Serve autoscaling:
    then ``replicas`` is what it starts with). ``decode_actors`` is how many decode (Data) actors
    of ``decode_cpus`` fit on what the replicas leave free (the most the pipeline will start).
    ``threads`` is the model threads per replica when the plan gives it more than the CPUs it
    reserves; ``None`` leaves the replica's default (its reserved CPUs).
    """

    replicas: int
    bundle: Mapping[str, float]
    planned: bool
    decode_actors: int
    decode_cpus: float
    threads: int | None
    free: Mapping[str, float]

    def describe(self, name: str) -> str:
        """One line for the log: ``pre-processor faces@1: 2 replicas x 1 CPU, ...``."""
        per = " + ".join(f"{_amount(k, v)} {k}" for k, v in self.bundle.items()) or "nothing"
        how = "planned on the free capacity" if self.planned else "fixed by the release"
        threads = f"{self.threads} model threads each" if self.threads else "model threads as reserved"
        free = " + ".join(f"{_amount(k, v)} {k}" for k, v in sorted(self.free.items()) if k in ("CPU", "GPU"))
        return (
            f"pre-processor {name}: {self.replicas} replica{'s' if self.replicas != 1 else ''} x {per} ({how}), "
            f"{threads}, {self.decode_actors} decode actor{'s' if self.decode_actors != 1 else ''} x "
            f"{self.decode_cpus:g} CPU fit beside them; free: {free or 'nothing'}"
        )


def _place(
    bundle: Mapping[str, float], replicas: int, nodes: Sequence[Mapping[str, float]]
) -> list[dict[str, float]] | None:
    """What is left of ``nodes`` after first-fit placing ``replicas`` bundles; None if they do not fit."""
    free = [dict(n) for n in nodes]
    for _ in range(replicas):
        node = next((n for n in free if _fits(n, bundle)), None)
        if node is None:
            return None
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return free


def plan_replicas(
    bundle: Mapping[str, float],
    available: Sequence[Mapping[str, float]],
    *,
    fixed: int | None = None,
    decode_cpus: float = 0.5,
    reserve_cpus: float = 0.1,
    max_decode_actors: int = 16,
    cores: int | None = None,
    limit: int = MAX_PLANNED_REPLICAS,
) -> ReplicaPlan:
    """Size a run's pre-processor on the nodes' free resources (``available``, one dict a node).

    Replicas: ``fixed`` when the release fixes the count; otherwise the most (up to ``limit``)
    whose bundles, first-fit on the free resources, still leave room on some node for one decode
    actor of ``decode_cpus`` per two replicas (each decode actor keeps two batches in flight) plus
    ``reserve_cpus`` on every node for the read tasks, as the pipeline plans them. When not one
    replica fits now, the plan is one replica and the capacity gate says why.

    Threads: on a single-node cluster (a local run), the node's free CPUs (at most its ``cores``,
    when known) are divided among the replicas, and a replica whose share is more than the CPUs it
    reserves runs that many model threads. Measured here (2 cores, faces app, Haar cascade):
    OpenCV on 1 thread 6.2-6.3 images/s, on 2 threads 11.6-11.9, two processes of 1 thread each
    11.5-12.3 — as fast as each other, so on a node that cannot hold a replica per core next to
    its decode actor (2 CPUs: 2 x 1 CPU + 0.5 + 0.1 does not fit) the one replica it holds takes
    the second core as a thread rather than leaving it idle. A release that fixes its replicas
    gets its threads planned the same way. The reservation never changes: Ray still places each
    replica on its declared bundle, so the capacity gate and other work see what is declared.
    """
    bundle = {k: float(v) for k, v in bundle.items() if v}
    free_total: dict[str, float] = {}
    for node in available:
        for k, v in node.items():
            free_total[k] = free_total.get(k, 0.0) + float(v)

    def decode_room(left: Sequence[Mapping[str, float]]) -> int:
        shares = [{**n, "CPU": n.get("CPU", 0.0) - reserve_cpus} for n in left]
        return pack({"CPU": decode_cpus}, max_decode_actors, shares)

    if fixed is not None:
        replicas = max(1, fixed)
    else:
        replicas = 0
        for m in range(1, max(1, limit) + 1):
            left = _place(bundle, m, available)
            if left is None or decode_room(left) < math.ceil(m / 2):
                break
            # The replicas stay up after the run (the next run finds them): a planned count takes
            # at most half of what is free, so other runs and apps keep room beside it.
            if m > 1 and sum(n.get("CPU", 0.0) for n in left) < free_total.get("CPU", 0.0) / 2 - _EPS:
                break
            replicas = m
        replicas = max(1, replicas)
    left = _place(bundle, replicas, available)
    decode = decode_room(left) if left is not None else 0
    threads = None
    if left is not None and len(available) == 1:
        usable = available[0].get("CPU", 0.0)
        if cores is not None:
            usable = min(usable, float(cores))
        share = math.floor((usable + _EPS) / replicas)
        reserved = max(1, round(bundle.get("CPU", 0.0)))
        threads = share if share > reserved else None
    return ReplicaPlan(replicas, bundle, fixed is None, decode, decode_cpus, threads, free_total)
