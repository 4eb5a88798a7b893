"""Assemble and run the Ray Data pipeline: task ids → annotator actors → outcome batches.

Sizing is explicit: each annotator actor reserves `actor_cpus`, read tasks a tenth of a CPU, and
the pool is checked against what the nodes can hold before anything starts (a pipeline whose
actors cannot be placed would otherwise wait forever). Ray Data's no-progress timeout and actor
start timeout are set so a mis-budgeted run fails with a clear message instead of hanging.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from totask_ray.params import Method

if TYPE_CHECKING:
    from totask_ray.driver import RunContext

log = logging.getLogger("totask_ray")

MAX_DEFAULT_ACTORS = 16


def node_cpus() -> list[float]:
    import ray

    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def plan_actors(requested: int | None, actor_cpus: float, reserved_cpus: float = 0.0) -> int:
    """How many annotator actors to run: as asked, or one per CPU left after `reserved_cpus`.

    Raises `CriticalError` when not even one actor fits on any node: Ray would wait for ever.
    """
    from totask_ray.driver import CriticalError

    cpus = node_cpus()
    biggest = max(cpus, default=0.0)
    if actor_cpus > biggest:
        raise CriticalError(
            f"Annotator actors need {actor_cpus} CPU each but the largest node has {biggest}: "
            "lower actor_cpus or add a bigger node"
        )
    if requested is not None:
        return requested
    free = max(sum(cpus) - reserved_cpus, actor_cpus)
    return max(1, min(MAX_DEFAULT_ACTORS, int(free // 1) or 1))


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


def configure_data_context(ctx: RunContext) -> None:
    from ray.data import DataContext

    dc = DataContext.get_current()
    verbose = ctx.options.verbose_ray
    dc.enable_progress_bars = verbose
    dc.enable_operator_progress_bars = verbose
    dc.enable_auto_log_stats = False
    dc.execution_no_progress_timeout_s = ctx.options.no_progress_timeout_s
    dc.wait_for_min_actors_s = ctx.options.actor_start_timeout_s
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_pipeline(ctx: RunContext) -> Iterator[dict[str, Any]]:
    """Yield outcome batches (numpy columns) as the annotators produce them."""
    from ray.data import ActorPoolStrategy

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
        reserved = ctx.inference.reserved_cpus if ctx.inference is not None else 0.0
    else:
        annotator, ctor_kwargs, reserved = FileAnnotator, {"settings": settings}, 0.0
    actors = plan_actors(o.num_actors, o.actor_cpus, reserved)
    source = TaskIdSource(
        ctx.config,
        ctx.params.project,
        ctx.params.task_filters,
        ctx.total,
        page_size=o.page_size,
        exclude=ctx.exclude,
    )
    log.info("annotating %d task(s) with %d %s actor(s)", ctx.total, actors, annotator.__name__)
    ds = task_dataset(source).map_batches(
        annotator,
        fn_constructor_kwargs=ctor_kwargs,
        batch_size=ctx.params.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=o.actor_cpus,
    )
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    except CriticalError:
        raise
    except Exception as exc:
        raise CriticalError(_explain(exc)) from exc


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
