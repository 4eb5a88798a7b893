"""Assemble and run the Ray Data pipeline: task ids → annotator actors → outcome batches.

Sizing is explicit: each annotator actor reserves `actor_cpus`, read tasks a tenth of a CPU, and
the pool is checked against what the nodes can hold before anything starts (a pipeline whose
actors cannot be placed would otherwise wait forever). Ray Data's no-progress timeout and actor
start timeout are set so a mis-budgeted run fails with a clear message instead of hanging.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from totask_ray.params import Method
from totask_ray.pipeline.source import READ_TASK_CPUS

if TYPE_CHECKING:
    from totask_ray.driver import RunContext

log = logging.getLogger("totask_ray")

MAX_DEFAULT_ACTORS = 16


def plan_actors(requested: int | None, actor_cpus: float) -> int:
    """How many annotator actors to run: as asked, or as many as the nodes' free CPUs hold now.

    Free, not total: Serve replicas (this run's pre-processor or anyone else's) already hold theirs.
    Raises `CriticalError` at once when not even one actor can be placed: Ray would otherwise wait
    until the actor start timeout with nothing to show for it.
    """
    from totask_ray.driver import CriticalError
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


def ship_plugin(cls: type) -> None:
    """Make a user's ToTask subclass loadable on the workers.

    A plugin installed as a package (or shipped with `ray job submit --working-dir`) is imported by
    reference. One defined in a script, a notebook or a module that only the driver can import is
    pickled by value instead, so `ToTask` subclasses work wherever they are written.
    """
    import sys
    import sysconfig

    from ray import cloudpickle

    name = cls.__module__
    if name == "__main__" or name.startswith("totask_ray"):
        return  # cloudpickle already ships __main__ by value; ours is installed everywhere
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) or ""
    installed = path.startswith((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]))
    if module is not None and not installed:
        cloudpickle.register_pickle_by_value(module)


def listing_moves_under_us(ctx: RunContext) -> bool:
    """True when writing a task can take it out of the filters (on_success changes a filtered
    field): offset pages read later would then skip tasks."""
    action = ctx.params.on_success
    if action is None:
        return False
    moved = {"status"} if (action.status is not None or action.submit) else set()
    if action.assignee is not None:
        moved.add("assignee")
    return any(key.split("__", 1)[0] in moved for key in ctx.params.task_filters)


def snapshot_dataset(ctx: RunContext, source: Any) -> Any:
    """Every matching id read before anything is written (8 bytes a task), as a dataset."""
    import numpy as np
    import ray.data

    from totask_ray.pipeline.source import _block

    ids = np.fromiter(
        ctx.client.iter_task_ids(
            ctx.params.project, ctx.params.task_filters, page_size=ctx.options.page_size
        ),
        dtype=np.int64,
    )
    log.info("on_success changes a filtered field: listed %d task id(s) before writing", len(ids))
    return ray.data.from_arrow(_block(ids.tolist(), source.exclude))


def configure_data_context(ctx: RunContext) -> None:
    from ray.data import DataContext

    dc = DataContext.get_current()
    verbose = ctx.options.verbose_ray
    dc.enable_progress_bars = verbose
    dc.enable_operator_progress_bars = verbose
    dc.enable_auto_log_stats = False
    dc.execution_no_progress_timeout_s = ctx.options.no_progress_timeout_s
    # Actors start while the first ids are read (waiting for them first costs seconds to the first
    # write); plan_actors has already checked they fit, and the no-progress timeout covers the rest.
    dc.wait_for_min_actors_s = -1
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # a run with fewer id blocks than actors is normal (small projects, resumes): not news
        warnings.filterwarnings(
            "ignore", message="The (minimum|maximum) number of concurrent", category=UserWarning
        )


def run_pipeline(ctx: RunContext) -> Iterator[dict[str, Any]]:
    """Yield outcome batches (numpy columns) as the annotators produce them."""

    from totask_ray.driver import CriticalError, worker_settings
    from totask_ray.pipeline.source import TaskIdSource, task_dataset
    from totask_ray.pipeline.workers import FileAnnotator

    o = ctx.options
    configure_data_context(ctx)
    ship_plugin(ctx.action_cls)
    settings = worker_settings(ctx)
    if ctx.params.method is Method.INFERENCE:
        from totask_ray.inference import InferenceAnnotator, inference_worker_kwargs

        annotator: type = InferenceAnnotator
        ctor_kwargs = inference_worker_kwargs(ctx, settings)
    else:
        annotator, ctor_kwargs = FileAnnotator, {"settings": settings}
    actors = plan_actors(o.num_actors, o.actor_cpus)
    source = TaskIdSource(
        ctx.config,
        ctx.params.project,
        ctx.params.task_filters,
        ctx.total,
        page_size=o.page_size,
        exclude=ctx.exclude,
    )
    dataset = snapshot_dataset(ctx, source) if listing_moves_under_us(ctx) else task_dataset(source)
    log.info("annotating %d task(s) with %d %s actor(s)", ctx.total, actors, annotator.__name__)
    ds = dataset.map_batches(
        annotator,
        fn_constructor_kwargs=ctor_kwargs,
        batch_size=ctx.params.batch_size,
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


def _explain(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if "no progress" in low or ("progress" in low and "timeout" in low):
        return (
            "The pipeline made no progress within the no-progress timeout: the cluster cannot run the annotator "
            "actors and the pre-processor together. Lower actor_cpus, the pre-processor's resources, or add nodes."
        )
    if "actor" in low and ("timed out" in low or "timeout" in low):
        return "Annotator actors could not start in time: the cluster has no room for them. Lower actor_cpus or add nodes."
    return f"The pipeline failed: {type(exc).__name__}: {text[:300]}"
