"""Assemble and run the Ray Data pipeline: task ids → annotator actors → outcome batches.

This module knows no method: it is handed an annotator class and its constructor arguments
(`AnnotatorSpec`) and carries task ids through it. Sizing is explicit: each annotator actor
reserves `actor_cpus`, read tasks a tenth of a CPU, and the pool is checked against what the nodes
can hold before anything starts (a pipeline whose actors cannot be placed would otherwise wait
forever). Ray Data's no-progress timeout is set so a mis-budgeted run fails with a clear message
instead of hanging.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from totask_ray.errors import CriticalError
from totask_ray.params import OnSuccess
from totask_ray.pipeline.source import READ_TASK_CPUS, TaskIdSource, id_block, task_dataset
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.base import Platform

log = logging.getLogger("totask_ray")

MAX_DEFAULT_ACTORS = 16


@dataclass(frozen=True)
class AnnotatorSpec:
    """The actor class a method runs and what its constructor takes (shipped once to each actor)."""

    cls: type
    kwargs: dict[str, Any]


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


def plan_actors(requested: int | None, actor_cpus: float) -> int:
    """How many annotator actors to run: as asked, or as many as the nodes' free CPUs hold now.

    Free, not total: Serve replicas (this run's pre-processor or anyone else's) already hold theirs.
    Raises `CriticalError` at once when not even one actor can be placed: Ray would otherwise wait
    with nothing to show for it.
    """
    from totask_ray.serving.capacity import pack, read_cluster

    snapshot = read_cluster()
    bundle = {"CPU": actor_cpus}
    # leave a read task's share of a CPU free so task ids can still be listed
    free = [{**node, "CPU": node.get("CPU", 0.0) - READ_TASK_CPUS} for node in snapshot.available]
    fits_now = pack(bundle, MAX_DEFAULT_ACTORS if requested is None else requested, free)
    if fits_now == 0:
        biggest = max((n.get("CPU", 0.0) for n in snapshot.totals), default=0.0)
        held = sum(n.get("CPU", 0.0) for n in snapshot.totals) - sum(
            n.get("CPU", 0.0) for n in snapshot.available
        )
        raise CriticalError(
            f"No room for annotator actors: each needs {actor_cpus:g} CPU, the largest node has {biggest:g} and "
            f"{held:g} CPU are held by other work (e.g. Serve replicas). Lower actor_cpus, delete idle Serve "
            "applications, or add nodes."
        )
    if requested is not None:
        return requested  # more than fit now: Ray Data places them as resources free up
    return max(1, min(MAX_DEFAULT_ACTORS, fits_now))


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


def snapshot_dataset(spec: PipelineSpec, source: TaskIdSource) -> Any:
    """Every matching id read before anything is written (8 bytes a task), as a dataset."""
    import ray.data

    assert spec.lister is not None, "a snapshot of the ids needs a platform client to list them"
    ids = np.fromiter(
        spec.lister.iter_task_ids(
            spec.run.params.project, spec.run.params.task_filters, page_size=spec.run.options.page_size
        ),
        dtype=np.int64,
    )
    log.info("on_success changes a filtered field: listed %d task id(s) before writing", len(ids))
    return ray.data.from_arrow(id_block(ids.tolist(), source.exclude))


def configure_data_context(no_progress_timeout_s: float, verbose: bool) -> None:
    from ray.data import DataContext

    dc = DataContext.get_current()
    dc.enable_progress_bars = verbose
    dc.enable_operator_progress_bars = verbose
    dc.enable_auto_log_stats = False
    dc.execution_no_progress_timeout_s = no_progress_timeout_s
    # Actors start while the first ids are read (waiting for them first costs seconds to the first
    # write); plan_actors has already checked they fit, and the no-progress timeout covers the rest.
    dc.wait_for_min_actors_s = -1
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # "Progress bars disabled": we disabled them (our own progress is the driver's)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        # a run with fewer id blocks than actors is normal (small projects, resumes): not news
        warnings.filterwarnings(
            "ignore", message="The (minimum|maximum) number of concurrent", category=UserWarning
        )


def run_pipeline(spec: PipelineSpec) -> Iterator[dict[str, Any]]:
    """Yield outcome batches (numpy columns) as the annotators produce them."""
    p, o = spec.run.params, spec.run.options
    configure_data_context(o.no_progress_timeout_s, o.verbose_ray)
    ship_plugin(spec.run.action_cls)
    actors = plan_actors(o.num_actors, o.actor_cpus)
    source = TaskIdSource(spec.run, spec.total, exclude=spec.exclude, stop_flag=spec.stop_flag)
    moving = listing_moves_under_us(p.on_success, p.task_filters)
    dataset = snapshot_dataset(spec, source) if moving else task_dataset(source)
    annotator = spec.annotator
    log.info("annotating %d task(s) with %d %s actor(s)", spec.total, actors, annotator.cls.__name__)
    ds = dataset.map_batches(
        annotator.cls,
        fn_constructor_kwargs=annotator.kwargs,
        batch_size=p.batch_size,
        batch_format="numpy",
        compute=actor_pool(actors, fixed=o.num_actors is not None),
        num_cpus=o.actor_cpus,
    )
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    except CriticalError:
        raise
    except Exception as exc:
        raise CriticalError(_explain(exc)) from exc


def actor_pool(actors: int, *, fixed: bool) -> Any:
    """The annotator pool: as many actors as asked for, or grown from one.

    By default one actor starts first and the pool grows to `actors` while it works: three actors
    importing Ray Data at once on a small node took seconds longer to write anything, and a run
    with little to do never pays for actors it would not use. A size the user asked for is kept
    from the start (they may be spreading the work over nodes on purpose). Two blocks in flight
    per actor keep the end of a run short: a block queued behind another on a busy actor would
    wait while other actors idle.
    """
    from ray.data import ActorPoolStrategy

    if fixed:
        return ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2)
    return ActorPoolStrategy(min_size=1, max_size=actors, initial_size=1, max_tasks_in_flight_per_actor=2)


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
