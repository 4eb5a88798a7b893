"""How many annotator actors a run may use: sized on the cluster it can grow to, not on the box.

The most a pool may have is what the cluster holds once its autoscaler has added every node its
node types allow (`ClusterSnapshot.grown`), less the CPUs the method's own services hold (a
pre-processor's replicas at their most), bounded by the run's batches (an actor with no batch to
take does nothing) and by `--max-actors` on a shared cluster. `--num-actors` fixes the size instead.

Where that many fit on the nodes that are up, the pool starts with one actor (the first write comes
fastest when one actor imports Ray Data, not three at once on a small node) and Ray Data's actor
autoscaler grows it while the work keeps the actors busy. Where they do not, the pool starts whole:
Ray Data sizes its budget on the nodes that are up, so it never creates an actor that needs a node
to come, and its own cluster autoscaler asks for nodes on a throughput heuristic (at most every 10 s,
on a rolling utilization window) that never asked in a 105 s run here (measured on the fake
autoscaler: 1,500 tasks all ran on the head). Pending actors are a resource demand the cluster's
autoscaler answers with nodes at once; they take work as they come up, and when the run ends
they go and the nodes idle out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from totask_ray.errors import CriticalError
from totask_ray.pipeline.source import READ_TASK_CPUS
from totask_ray.serving.capacity import ClusterSnapshot, holds

log = logging.getLogger("totask_ray")


@dataclass(frozen=True)
class PoolPlan:
    """The annotator pool: start with `initial`, grow to `most`; `fixed` when the user set the size.
    `initial == most` beyond `fit_now`: the pool starts whole and its pending actors bring up nodes."""

    initial: int
    most: int
    fixed: bool
    fit_now: int
    why: str

    def describe(self, actor: str, actor_cpus: float) -> str:
        """One line for the log: what was sized, from what."""
        if self.fixed:
            size = f"{self.most} {actor} actor{'s' if self.most != 1 else ''} (fixed by --num-actors)"
        else:
            size = f"{self.initial} {actor} actor growing to at most {self.most}"
            if self.initial == self.most and self.most > self.fit_now:
                size = (
                    f"{self.most} {actor} actors from the start ({self.fit_now} fit now, the rest wait for "
                    "nodes the autoscaler adds)"
                )
        return f"annotator pool: {size} x {actor_cpus:g} CPU; {self.why}"


def plan_pool(
    snapshot: ClusterSnapshot,
    *,
    actor_cpus: float,
    batches: int,
    num_actors: int | None = None,
    max_actors: int | None = None,
    reserved_cpus: float = 0.0,
) -> PoolPlan:
    """Size the pool (see the module doc). Raises `CriticalError` when not one actor can ever be
    placed, now or on a node the autoscaler could add: Ray would otherwise wait with nothing to show."""
    bundle = {"CPU": actor_cpus}
    now = [(node, 1) for node in snapshot.available]
    headroom = snapshot.headroom()
    fit_now = holds(now, bundle, READ_TASK_CPUS)
    fit_new = holds(headroom, bundle, READ_TASK_CPUS)
    if fit_now == 0 and fit_new == 0:
        biggest = max((n.get("CPU", 0.0) for n in snapshot.totals), default=0.0)
        held = sum(n.get("CPU", 0.0) for n in snapshot.totals) - sum(
            n.get("CPU", 0.0) for n in snapshot.available
        )
        raise CriticalError(
            f"No room for annotator actors: each needs {actor_cpus:g} CPU, the largest node has {biggest:g} and "
            f"{held:g} CPU are held by other work (e.g. Serve replicas), and the cluster's node types add no node "
            "that holds one. Lower actor_cpus, delete idle Serve applications, or add nodes."
        )
    grown = holds(snapshot.grown(), bundle, READ_TASK_CPUS)
    held_back = math.ceil(reserved_cpus / actor_cpus - 1e-9) if reserved_cpus > 0 else 0
    ceiling = max(1, grown - held_back)
    cluster = snapshot.describe()
    waiting = "" if fit_now else "; none fits now: the first waits for a node the autoscaler adds"
    if num_actors is not None:
        if num_actors > grown:
            raise CriticalError(too_many_actors(num_actors, actor_cpus, grown, cluster))
        if num_actors > ceiling:
            log.warning(
                "--num-actors %d leaves less than %g CPU for the pre-processor's replicas at their most: "
                "they may not scale up while the pool runs",
                num_actors,
                reserved_cpus,
            )
        return PoolPlan(num_actors, num_actors, True, fit_now, f"cluster: {cluster}{waiting}")
    bounds = {"the cluster once grown": ceiling, f"{batches} batch(es) of work": max(1, batches)}
    if max_actors is not None:
        bounds["--max-actors"] = max_actors
    held = f" less {reserved_cpus:g} CPU for the pre-processor's replicas" if held_back else ""
    most = min(bounds.values())
    by = min(bounds, key=lambda k: bounds[k])
    why = f"{grown} fit the cluster once grown{held}, bounded by {by}; cluster: {cluster}{waiting}"
    needs_nodes = most > fit_now and bool(headroom)
    return PoolPlan(most if needs_nodes else 1, most, False, fit_now, why)


def too_many_actors(num_actors: int, actor_cpus: float, most: int, cluster: str) -> str:
    """Why a fixed pool cannot run: Ray would place every actor it can, then wait for room to read
    the task ids that feed them (measured: 4 x 0.5 CPU on a 2-CPU Ray made no progress for 300 s)."""
    return (
        f"--num-actors {num_actors} at {actor_cpus:g} CPU each does not fit: keeping {READ_TASK_CPUS:g} CPU "
        f"a node for reading task ids, the cluster holds at most {most} such actor{'s' if most != 1 else ''}, "
        f"even with every node its autoscaler may add (cluster: {cluster}). The actors would take every CPU "
        f"and the run would wait for a read that never starts. Use --num-actors {max(1, most)} or fewer, "
        "lower actor_cpus, or leave --num-actors out to size the pool on the cluster."
    )
