"""Assemble and run the Ray Data pipeline: task ids → annotator actors → outcome batches.

This module knows no method: it is handed an annotator class and its constructor arguments
(`AnnotatorSpec`) and carries task ids through it. Sizing is explicit: each annotator actor
reserves `actor_cpus`, read tasks a tenth of a CPU, and the pool is sized on what the cluster holds
once grown and checked before anything starts (`pipeline.sizing`: a pipeline whose actors cannot be
placed would otherwise wait forever). Ray Data's no-progress timeout is set so a mis-budgeted run fails with a clear message
instead of hanging.

Ray Data's settings are the run's own: a copy of the caller's `DataContext` that only this run's
datasets carry (`run_data_context`), and Ray Data's log levels and the one warning a run silences are
set only while the run iterates (`quiet_ray_data`); a notebook's own pipelines see none of it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from totask_ray.errors import CriticalError
from totask_ray.params import OnSuccess
from totask_ray.pipeline.sizing import PoolPlan, plan_pool
from totask_ray.pipeline.source import PAGES_PER_READ_TASK, Exclusion, TaskIdSource, list_ids, task_dataset
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.base import Platform, id_bounds

log = logging.getLogger("totask_ray")

# Batches each annotator actor works on at once; a pre-processor's autoscaling targets as many
# requests in flight per replica (each batch is one call in the batched convention).
IN_FLIGHT_PER_ACTOR = 2
# Consecutive annotator actors that may die before they start (a node lost while it boots) and be
# replaced, before the run fails.
ACTOR_INIT_DEATHS_TOLERATED = 3


@dataclass(frozen=True)
class AnnotatorSpec:
    """The actor class a method runs and what its constructor takes (shipped once to each actor)."""

    cls: type
    kwargs: dict[str, Any]
    # CPUs the method's own services may hold at most (a pre-processor's replicas): the pool leaves them
    reserved_cpus: float = 0.0


@dataclass
class PipelineSpec:
    """What the pipeline takes of a run: its spec, the annotator its method built, and what the steps
    before it found (the count, a resume's done ids). Nothing about the method."""

    run: RunSpec
    annotator: AnnotatorSpec
    total: int
    exclude: np.ndarray | None = None
    stop_flag: Any = None  # `pipeline.stop`: set, the reads stop listing and the actors stop starting tasks
    lister: Platform | None = field(default=None, repr=False)  # for a snapshot of the ids (see below)


def plan_actors(spec: PipelineSpec) -> PoolPlan:
    """The annotator pool of this run, sized on the cluster (`pipeline.sizing`), logged in one line."""
    from totask_ray.serving.capacity import read_cluster

    o = spec.run.options
    plan = plan_pool(
        read_cluster(o.declared_node_types()),
        actor_cpus=o.actor_cpus,
        batches=math.ceil(spec.total / spec.run.params.batch_size),
        num_actors=o.num_actors,
        max_actors=o.max_actors,
        reserved_cpus=spec.annotator.reserved_cpus,
    )
    log.info("%s", plan.describe(spec.annotator.cls.__name__, o.actor_cpus))
    return plan


def ship_plugin(cls: type | None) -> None:
    """Make a user's ToTask subclass loadable on the workers.

    A plugin installed as a package (or shipped with `ray job submit --working-dir`) is imported by
    reference. One defined in a script, a notebook or a module that only the driver can import is
    pickled by value instead, so `ToTask` subclasses work wherever they are written.
    """
    import sys
    import sysconfig

    from ray import cloudpickle

    if cls is None:
        return
    name = cls.__module__
    if name == "__main__" or name.startswith("totask_ray"):
        return  # cloudpickle already ships __main__ by value; ours is installed everywhere
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) or ""
    installed = path.startswith((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]))
    if module is not None and not installed:
        cloudpickle.register_pickle_by_value(module)


def listing_moves_under_us(on_success: OnSuccess | None, task_filters: Mapping[str, Any]) -> bool:
    """True when writing a task can take it out of the filters (on_success changes a filtered
    field): offset pages read later would then skip tasks."""
    if on_success is None:
        return False
    moved = {"status"} if (on_success.status is not None or on_success.submit) else set()
    if on_success.assignee is not None:
        moved.add("assignee")
    return any(key.split("__", 1)[0] in moved for key in task_filters)


def snapshot_dataset(spec: PipelineSpec, source: TaskIdSource, actors: int) -> Any:
    """Every matching id read before anything is written (8 bytes a task), as a dataset of blocks
    that keep every actor busy (`snapshot_blocks`).

    Only where the listing is read by offset pages: id ranges skip nothing while tasks leave the
    filters (`pipeline.source`), so such a run streams its ids as any other."""
    import ray.data

    ids = list_ids(source)
    log.info("on_success changes a filtered field: listed %d task id(s) before writing", len(ids))
    ids_per_read = PAGES_PER_READ_TASK * spec.run.options.page_size
    return ray.data.from_arrow(snapshot_blocks(ids, spec.run.params.batch_size, actors, ids_per_read))


def snapshot_blocks(ids: np.ndarray, batch_size: int, actors: int, ids_per_read: int) -> list[pa.Table]:
    """`ids` cut into blocks: as many as the streaming reads would make, and at least two per
    batch in flight on every actor, none smaller than a batch. A block goes to one actor whole (one
    table made one block, and one actor did all the work while the others idled)."""
    n = len(ids)
    if n == 0:
        return [pa.table({"task_id": np.zeros(0, dtype=np.int64)})]
    want = max(math.ceil(n / ids_per_read), actors * IN_FLIGHT_PER_ACTOR * 2)
    rows = max(batch_size, math.ceil(n / want))
    return [pa.table({"task_id": ids[i : i + rows]}) for i in range(0, n, rows)]


def run_data_context(no_progress_timeout_s: float, verbose: bool) -> Any:
    """The run's own Ray Data settings: a copy of the caller's current `DataContext` (what a user
    set there still holds) that only the run's datasets carry; the caller's is left as it was."""
    from ray.data import DataContext

    dc = DataContext.get_current().copy()
    dc.enable_progress_bars = verbose
    dc.enable_operator_progress_bars = verbose
    dc.enable_auto_log_stats = False
    dc.execution_no_progress_timeout_s = no_progress_timeout_s
    # Actors start while the first ids are read (waiting for them first costs seconds to the first
    # write); plan_actors has already checked they can be placed, now or on a node the autoscaler adds,
    # and the no-progress timeout covers the rest.
    dc.wait_for_min_actors_s = -1
    # Ray Data fails the whole run on the first actor that dies before it starts (its default is 0):
    # on a cluster that is adding nodes, an actor waiting for one dies with a node that failed to come
    # up. A few such deaths are replaced; a constructor that always fails still ends the run.
    dc.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS_TOLERATED
    return dc


# Ray Data warns (warnings.warn, from its executor's thread) when an operator got fewer blocks than
# its pool's minimum size or its read concurrency: normal for small projects and resumes, not news.
_FEW_BLOCKS = r"The (minimum|maximum) number of concurrent"


@contextlib.contextmanager
def quiet_ray_data(verbose: bool) -> Iterator[None]:
    """While the run iterates, unless `verbose`: Ray Data's info lines and its few-blocks warning
    left out (our own progress is the driver's). Both are put back as they were when the run ends.

    Python keeps one warnings filter list per process; `catch_warnings` restores it at the end, so
    the filter lasts only as long as the run, and it matches only that message from Ray Data."""
    if verbose:
        yield
        return
    names = ("ray.data", "ray.data._internal.progress")
    levels = {name: logging.getLogger(name).level for name in names}
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled": we disabled them
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=_FEW_BLOCKS, category=UserWarning, module=r"ray\.data\."
            )
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def listing(spec: PipelineSpec) -> TaskIdSource:
    """The run's task-id source: id ranges where the platform reads them, offset pages elsewhere;
    a resume's done ids shared once in the object store (`source.Exclusion`)."""
    p = spec.run.params
    bounds = id_bounds(spec.lister, p.project, p.task_filters) if spec.lister is not None else None
    exclusion = Exclusion.share(spec.exclude) if spec.exclude is not None and len(spec.exclude) else None
    how = f"by id ranges over {bounds[0]}..{bounds[1]}" if bounds is not None else "by offset pages"
    log.debug("task ids are listed %s", how)
    return TaskIdSource(spec.run, spec.total, exclude=exclusion, stop_flag=spec.stop_flag, bounds=bounds)


def run_pipeline(spec: PipelineSpec) -> Iterator[dict[str, Any]]:
    """Yield outcome batches (numpy columns) as the annotators produce them."""
    from ray.data import DataContext

    p, o = spec.run.params, spec.run.options
    ship_plugin(spec.run.action_cls)
    pool = plan_actors(spec)
    source = listing(spec)
    moving = listing_moves_under_us(p.on_success, p.task_filters) and source.bounds is None
    annotator = spec.annotator
    with quiet_ray_data(o.verbose_ray):
        with DataContext.current(run_data_context(o.no_progress_timeout_s, o.verbose_ray)):
            # datasets made here carry the run's context (Ray Data copies the current one)
            dataset = snapshot_dataset(spec, source, pool.most) if moving else task_dataset(source)
            ds = dataset.map_batches(
                annotator.cls,
                fn_constructor_kwargs=annotator.kwargs,
                batch_size=p.batch_size,
                batch_format="numpy",
                compute=actor_pool(pool),
                num_cpus=o.actor_cpus,
            )
        try:
            yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
        except CriticalError:
            raise
        except Exception as exc:
            raise CriticalError(_explain(exc)) from exc


def actor_pool(pool: PoolPlan) -> Any:
    """The annotator pool as Ray Data runs it (see `pipeline.sizing` for the sizes).

    Two blocks in flight per actor keep the end of a run short: a block queued behind another on a
    busy actor would wait while other actors idle.
    """
    from ray.data import ActorPoolStrategy

    if pool.fixed or pool.initial == pool.most:  # whole from the start: pending actors are never dropped
        return ActorPoolStrategy(size=pool.most, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR)
    return ActorPoolStrategy(
        min_size=1,
        max_size=pool.most,
        initial_size=pool.initial,
        max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR,
    )


def free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def wait_for_cpus(level: float, timeout_s: float = 2.0) -> bool:
    """Wait (bounded) until the cluster's free CPUs are back to `level`, as they were before the
    pipeline: its actors exit a fraction of a second after the run ends (`pipeline/stop.py`), and a
    run that returned before they had would leave the next one (a notebook's next cell) to find
    fewer CPUs than there are. Other work on a shared cluster can keep it from coming true; the
    bound keeps that from costing more than `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if free_cpus() >= level - 1e-6:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _explain(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if "no progress" in low or ("progress" in low and "timeout" in low):
        return (
            "The pipeline made no progress within the no-progress timeout: the cluster cannot run the annotator "
            "actors and the pre-processor together. Lower actor_cpus, the pre-processor's resources, or add nodes."
        )
    return f"The pipeline failed: {type(exc).__name__}: {text[:300]}"
