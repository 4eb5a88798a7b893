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

from totask_ray.serving.node_types import (
    DiscoveredTypes,
    NodeType,
    discover_node_types,
    node_types_from_cluster_config,
    node_types_from_cluster_yaml,
)

__all__ = [
    "CapacityError",
    "CapacityReport",
    "ClusterSnapshot",
    "NodeType",
    "ReplicaPlan",
    "Verdict",
    "assess",
    "check_capacity",
    "holds",
    "max_replicas",
    "most_replicas",
    "node_types_from_cluster_config",
    "node_types_from_cluster_yaml",
    "pack",
    "per_node",
    "plan_replicas",
    "read_cluster",
]

# Ray keeps resources in fixed point with 4 decimals; compare with a little slack.
_EPS = 1e-6
_GiB = 1024**3


class Verdict(StrEnum):
    FITS_NOW = "fits_now"
    BUSY = "busy"
    FITS_AFTER_SCALING = "fits_after_scaling"
    NEVER_FITS = "never_fits"


Group = tuple[Mapping[str, float], int]  # a node's resources, and how many such nodes


@dataclass(frozen=True)
class ClusterSnapshot:
    """Per-node totals and free resources of the alive nodes, and the autoscaler's node types.

    ``node_types`` is ``None`` when no source names any (a plain local cluster: see
    :mod:`~totask_ray.serving.node_types`); ``running`` counts the nodes of each type that are up, so
    a type's headroom is its most workers minus those. ``types_source`` says where the types came from.
    """

    totals: Sequence[Mapping[str, float]]
    available: Sequence[Mapping[str, float]]
    node_types: Sequence[NodeType] | None = None
    node_ids: Sequence[str] = ()
    running: Mapping[str, int] = field(default_factory=dict)
    types_source: str = "no autoscaler"

    def _room(self) -> list[tuple[NodeType, int]]:
        """Each node type that can still add nodes, with how many (:func:`_more_of`)."""
        return [(nt, more) for nt in self.node_types or () if (more := _more_of(nt, self.running)) > 0]

    def headroom(self) -> list[Group]:
        """The nodes the autoscaler may still add, one group per node type that can add any."""
        return [(nt.resources, more) for nt, more in self._room()]

    def grown(self) -> list[Group]:
        """The alive nodes' totals plus the headroom: the most this cluster can ever offer."""
        return [*((t, 1) for t in self.totals), *self.headroom()]

    def grown_total(self, resource: str) -> float:
        """How much of ``resource`` the cluster offers once grown (GPUs a pool from zero can add)."""
        return _sum_of(self.grown()).get(resource, 0.0)

    def describe(self) -> str:
        """``4 nodes, 64 CPU + 2 GPU up; node types add up to 3 x (8 CPU) (cpu)`` for a plan's log line."""
        up = _sum_of((t, 1) for t in self.totals)
        text = f"{len(self.totals)} node{'s' if len(self.totals) != 1 else ''}, {_short(up)} up"
        room = [f"{more} x ({_short(nt.resources)}) ({nt.name})" for nt, more in self._room()]
        if room:
            return f"{text}; node types add up to {', '.join(room)} (from {self.types_source})"
        return f"{text}; nothing to add ({self.types_source})"


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


def _scaled_nodes(
    node_types: Sequence[NodeType], replicas: int, running: Mapping[str, int] | None = None
) -> list[Mapping[str, float]]:
    # The nodes each type may still add, at most `replicas` per type: more never helps place
    # `replicas` bundles.
    nodes: list[Mapping[str, float]] = []
    for nt in node_types:
        nodes.extend([nt.resources] * max(0, min(_more_of(nt, running or {}), replicas)))
    return nodes


def _more_of(nt: NodeType, running: Mapping[str, int]) -> int:
    """The nodes of type ``nt`` the autoscaler may still add: its most workers less those up."""
    return nt.max_workers - running.get(nt.name, 0)


def _amount(resource: str, amount: float) -> str:
    return f"{amount / _GiB:.3g} GiB" if resource.endswith("memory") else f"{amount:g}"


def _fmt(resource: str, amount: float) -> str:
    return f"{resource} {_amount(resource, amount)}"


def _sum_of(groups: Iterable[Group]) -> dict[str, float]:
    out: dict[str, float] = {}
    for node, count in groups:
        for k, v in node.items():
            out[k] = out.get(k, 0.0) + float(v) * count
    return out


def _short(resources: Mapping[str, float]) -> str:
    shown = [f"{_amount(k, v)} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") and v > 0]
    return " + ".join(shown) or "no CPU"


def per_node(bundle: Mapping[str, float], node: Mapping[str, float], reserve_cpus: float = 0.0) -> int:
    """How many ``bundle`` one node holds after ``reserve_cpus`` are set aside (0 when none)."""
    left = {**node, "CPU": node.get("CPU", 0.0) - reserve_cpus}
    if left["CPU"] < -_EPS:
        return 0
    return max(0, max_replicas(bundle, left))


def holds(groups: Iterable[Group], bundle: Mapping[str, float], reserve_cpus: float = 0.0) -> int:
    """How many ``bundle`` the nodes hold in all, each node keeping ``reserve_cpus`` free."""
    return sum(per_node(bundle, node, reserve_cpus) * count for node, count in groups)


def _never_fits_message(
    bundle: Mapping[str, float],
    replicas: int,
    totals: Sequence[Mapping[str, float]],
    node_types: Sequence[NodeType],
    name: str | None,
    running: Mapping[str, int] | None = None,
) -> str:
    who = f"pre-processor {name}" if name else "pre-processor"
    scaled = _scaled_nodes(node_types, replicas, running)
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

    ``node_types`` are the user's declared node types (e.g. from cluster.yaml); given, they stand in
    for ``snapshot.node_types``. ``name`` (the app) goes into the message.
    """
    bundle = {k: float(v) for k, v in bundle.items() if v}
    types = list(node_types) if node_types is not None else list(snapshot.node_types or ())
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
    if (
        types
        and pack(bundle, replicas, [*snapshot.totals, *_scaled_nodes(types, replicas, snapshot.running)])
        >= replicas
    ):
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
        _never_fits_message(bundle, replicas, snapshot.totals, types, name, snapshot.running),
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


def read_cluster(node_types: Sequence[NodeType] | None = None) -> ClusterSnapshot:
    """Snapshot the connected Ray cluster (``ray.init`` must have been called), with the node types
    the user declared (``node_types``) or those the cluster names (:func:`discover_node_types`)."""
    from ray._private import state

    totals = state.total_resources_per_node()
    available = state.available_resources_per_node()
    node_ids = sorted(totals)
    try:
        found = discover_node_types(list(node_types) if node_types is not None else None)
    except Exception as exc:  # the autoscaler's state is a hint: never a new way for a run to fail
        found = DiscoveredTypes(None, f"node types unreadable ({type(exc).__name__})", {})
    return ClusterSnapshot(
        totals=[dict(totals[n]) for n in node_ids],
        available=[dict(available.get(n, {})) for n in node_ids],
        node_types=found.types,
        node_ids=[str(n) for n in node_ids],
        running=dict(found.running),
        types_source=found.source,
    )


@dataclass(frozen=True)
class ReplicaPlan:
    """How a run deploys its pre-processor: replicas, each one's bundle, its model threads.

    ``planned`` is False when the release fixed the count (``num_replicas``, or Serve autoscaling:
    then ``replicas`` is what it starts with and ``max_replicas`` equals it). A planned count starts
    at ``replicas`` (what fits on the free resources now, at least one) and may grow to
    ``max_replicas`` (what the cluster holds once its autoscaler has added every node it may).
    ``decode_actors`` is how many decode (Data) actors of ``decode_cpus`` fit beside the replicas
    now. ``threads`` is the model threads per replica when the plan gives it more than the CPUs it
    reserves; ``None`` leaves the replica's default (its reserved CPUs). ``grown_from`` is the
    cluster as the plan saw it (:meth:`ClusterSnapshot.describe`).
    """

    replicas: int
    bundle: Mapping[str, float]
    planned: bool
    decode_actors: int
    decode_cpus: float
    threads: int | None
    free: Mapping[str, float]
    max_replicas: int = 0
    grown_from: str = ""
    gpus_widened: bool = False
    fits_now: bool = True  # False: not one replica fits the free resources; the first waits for a node

    def describe(self, name: str) -> str:
        """One line for the log: ``pre-processor faces@1: 2 (up to 8) replicas x 1 CPU, ...``."""
        per = " + ".join(f"{_amount(k, v)} {k}" for k, v in self.bundle.items()) or "nothing"
        if self.planned:
            start = (
                f"{self.replicas} fit now" if self.fits_now else "none fits now, 1 starts on a node to come"
            )
            how = f"planned: {start}, up to {self.max_replicas} once the cluster has grown"
        else:
            how = "fixed by the release"
        if self.gpus_widened:
            how += "; one whole GPU each so that no two share a device"
        threads = f"{self.threads} model threads each" if self.threads else "model threads as reserved"
        free = " + ".join(f"{_amount(k, v)} {k}" for k, v in sorted(self.free.items()) if k in ("CPU", "GPU"))
        return (
            f"pre-processor {name}: {self.replicas} replica{'s' if self.replicas != 1 else ''} x {per} ({how}), "
            f"{threads}, {self.decode_actors} decode actor{'s' if self.decode_actors != 1 else ''} x "
            f"{self.decode_cpus:g} CPU fit beside them; free: {free or 'nothing'}"
            + (f"; cluster: {self.grown_from}" if self.grown_from else "")
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


def _room_beside(
    bundle: Mapping[str, float], m: int, groups: Sequence[Group], decode_cpus: float, reserve_cpus: float
) -> tuple[int, float] | None:
    """Decode actors that fit beside ``m`` replicas placed first-fit on ``groups`` (whole groups of
    identical nodes are filled arithmetically, so a pool of thousands of nodes costs one step), and
    the CPUs the replicas leave; None when the replicas do not fit."""
    decode = {"CPU": decode_cpus}
    left_to_place, room, cpus_left = m, 0, 0.0
    for node, count in groups:
        k = per_node(bundle, node) if left_to_place else 0
        full = min(count, left_to_place // k) if k else 0
        partial = left_to_place - full * k if k and full < count else 0
        partial = min(partial, k)
        for n, placed in (
            (full, k),
            (1 if partial else 0, partial),
            (count - full - (1 if partial else 0), 0),
        ):
            if n <= 0:
                continue
            rest = {key: node.get(key, 0.0) - bundle.get(key, 0.0) * placed for key in {*node, *bundle}}
            room += per_node(decode, rest, reserve_cpus) * n
            cpus_left += rest.get("CPU", 0.0) * n
        left_to_place -= full * k + partial
    return None if left_to_place > 0 else (room, cpus_left)


def most_replicas(
    bundle: Mapping[str, float],
    groups: Sequence[Group],
    *,
    decode_cpus: float,
    reserve_cpus: float,
    keep_half: bool = False,
) -> int:
    """The most replicas that fit on ``groups`` with room left for one decode actor per two replicas
    (each decode actor keeps two batches in flight) and ``reserve_cpus`` on every node for the read
    tasks; 0 when not one fits. ``keep_half``: also leave at least half the CPUs free, so a first
    run on a shared cluster does not take all of it at once (its replicas grow on demand).
    Binary search: fitting is monotone in the count."""
    total_cpus = _sum_of(groups).get("CPU", 0.0)

    def ok(m: int) -> bool:
        placed = _room_beside(bundle, m, groups, decode_cpus, reserve_cpus)
        if placed is None or placed[0] < math.ceil(m / 2):
            return False
        return not (keep_half and m > 1 and placed[1] < total_cpus / 2 - _EPS)

    lo, hi = 0, max(0, holds(groups, bundle))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_replicas(
    bundle: Mapping[str, float],
    available: Sequence[Mapping[str, float]],
    *,
    fixed: int | None = None,
    decode_cpus: float = 0.5,
    reserve_cpus: float = 0.1,
    cores: int | None = None,
    grown: Sequence[Group] | None = None,
    grown_from: str = "",
) -> ReplicaPlan:
    """Size a run's pre-processor: what fits now (``available``, one dict a node) and what the
    cluster holds once grown (``grown``: the nodes' totals plus the autoscaler's headroom).

    Replicas: ``fixed`` when the release fixes the count; otherwise start with the most whose bundles,
    first-fit on the free resources, leave room for the decode actors that feed them (see
    :func:`most_replicas`; at most half the free CPUs), at least one; and let Serve's autoscaler grow
    them up to the most the grown cluster holds beside its decode actors. When not one replica fits
    now, the plan starts with one and the capacity gate says whether a node can be added for it.

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
    free_total = _sum_of((n, 1) for n in available)
    now = [(n, 1) for n in available]
    if fixed is not None:
        replicas = most = max(1, fixed)
    else:
        fit = most_replicas(bundle, now, decode_cpus=decode_cpus, reserve_cpus=reserve_cpus, keep_half=True)
        replicas = max(1, fit)
        grown_groups = grown if grown is not None else now
        most = max(
            replicas, most_replicas(bundle, grown_groups, decode_cpus=decode_cpus, reserve_cpus=reserve_cpus)
        )
    left = _place(bundle, replicas, available)
    decode = holds([(n, 1) for n in left], {"CPU": decode_cpus}, reserve_cpus) if left is not None else 0
    threads = None
    if left is not None and len(available) == 1:
        usable = available[0].get("CPU", 0.0)
        if cores is not None:
            usable = min(usable, float(cores))
        share = math.floor((usable + _EPS) / replicas)
        reserved = max(1, round(bundle.get("CPU", 0.0)))
        threads = share if share > reserved else None
    return ReplicaPlan(
        replicas, bundle, fixed is None, decode, decode_cpus, threads, free_total, most, grown_from,
        fits_now=fixed is not None or fit > 0 or pack(bundle, 1, available) > 0,
    )  # fmt: skip
