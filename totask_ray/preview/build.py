"""`preview`: the job's method on a sample of its tasks, as a page, writing nothing.

The sample goes through `run_to_task` itself with `dry_run=True` and the sample's ids added to the
job's filters (`id__in`, which both platforms take): prepare, the hooks, the label mapping, the
thresholds, the validation and the outcome records are the run's own code, not a copy of it, and
the dry run is what already guarantees that nothing is written (tests/test_dry_run.py). What the
page adds is read afterwards: the tasks' images and current data, and the drop counts.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from totask_ray.action import ToTask
from totask_ray.params import ToTaskParams
from totask_ray.pipeline.outcomes import read_report
from totask_ray.pipeline.spec import RunOptions, RunSpec
from totask_ray.platform.connect import PlatformConfig, config_from_env, connect
from totask_ray.platform.errors import PlatformFilterError
from totask_ray.preview.collect import fill_views, views_from_report
from totask_ray.preview.drops import Drops, count_drops
from totask_ray.preview.estimate import (
    Estimate,
    Pass,
    annotator_pass,
    dry_run_startup,
    local_cluster,
    others_cores,
    pool_most,
    probe_platform,
    running_replicas,
    stage_rates,
    this_machine,
)
from totask_ray.preview.page import MAX_PAGE_BYTES, PreviewPage, render
from totask_ray.preview.sample import SampleError, draw_sample
from totask_ray.run.driver import run_to_task

log = logging.getLogger("totask_ray")

# Options a preview sets itself: it is a dry run with a report of its own, and no job record.
_OWN = {"dry_run", "report", "resume", "job_id", "create_job", "projected_s"}


def preview(
    params: ToTaskParams | dict[str, Any],
    platform: PlatformConfig | None = None,
    action_cls: type[ToTask] = ToTask,
    *,
    sample: int = 20,
    seed: int | None = 0,
    first: bool = False,
    out: str | Path | None = None,
    max_bytes: int = MAX_PAGE_BYTES,
    options: RunOptions | None = None,
    fresh_process: bool = False,
    **overrides: Any,
) -> PreviewPage:
    """Run the job on `sample` of the tasks its filters select (`first`: the first ones, else drawn
    with `seed`) as a dry run, and return the page (`.save(path)`; Jupyter shows it inline).

    `params`, `platform`, `action_cls`, `options` and the option keywords are `run_to_task`'s;
    the dry run, its report and the job record are the preview's own. Writes `out` when given.
    `fresh_process`: the run will be a process of its own (the CLI's), so a Ray this preview started
    and what its prepare deployed there are started again: the estimate counts them (`estimate`).
    Raises `ToTaskError` when the run itself fails (a pre-processor that cannot start, say), and
    `SampleError` when no sample can be drawn."""
    params = ToTaskParams.parse(params)
    given = set(overrides) & _OWN
    if given:
        raise SampleError(f"preview sets {', '.join(sorted(given))} itself: leave them out")
    base = {} if options is None else options.model_dump(exclude_unset=True)
    opts = RunOptions.model_validate({**{k: v for k, v in base.items() if k not in _OWN}, **overrides})
    config = (platform or config_from_env()).for_job(params.name, params.project)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    client = connect(config)
    held: list[Any] = []  # what the method holds until the preview ends (`_start`)
    try:
        try:
            ids, total = draw_sample(
                client, params.project, params.task_filters, sample, seed=seed, first=first,
                page_size=opts.page_size,
            )  # fmt: skip
        except PlatformFilterError as exc:
            raise SampleError(f"The task filters cannot be used: {exc}") from exc
        timings["sample_s"] = time.perf_counter() - t0
        t_list = time.perf_counter()
        client.task_id_page(params.project, params.task_filters, page=1, page_size=opts.page_size)
        timings["listing_page_s"] = time.perf_counter() - t_list
        # The project's classes: Synapse's, or the labels of Label Studio's labeling config.
        classes = [c.name for c in client.get_project(params.project).classes]
        controls = labeling_controls(client, params.project)
        platform_name = client.name
        sampled = params.model_copy(update={"task_filters": {**params.task_filters, "id__in": ids}})
        spec = RunSpec(params=params, options=opts, platform=config, action_cls=action_cls)
        ray_start_s, prepare_s, reserved, app, annotator = _start(spec, client, held)
        with tempfile.TemporaryDirectory(prefix="totask-preview-") as tmp:
            report = Path(tmp) / "preview.jsonl"
            t1, wall1 = time.perf_counter(), time.time()
            result = run_to_task(
                sampled, platform=config, action_cls=action_cls, options=opts,
                dry_run=True, report=report,
            )  # fmt: skip
            timings["dry_run_s"] = time.perf_counter() - t1
            records = list(read_report(str(report)))
            startup_s = dry_run_startup(records, wall1, time.time())
            views = views_from_report(records)
        t2 = time.perf_counter()
        fill_views(spec, views)
        timings["read_sample_s"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        drops = _drops(params, client, [v.image for v in views if v.image is not None], opts)
        timings["drops_s"] = time.perf_counter() - t3
        most = pool_most(spec, total, reserved)
        most_dry = pool_most(spec, len(ids), reserved)  # the sample's dry run's pool
        others = others_cores()
        probe = probe_platform(spec, ids, most * opts.concurrency)
        passed = _pass(annotator, ids, params.batch_size) if local_cluster() else None
        timings["write_probe_s"] = probe.wall_s / probe.chains
    finally:
        for let_go in held:
            let_go()
        client.close()
    per_image = drops.call_s / drops.call_images if drops.call_s is not None and drops.call_images else None
    machine = this_machine(probe, passed, others, busy=most + 1)
    estimate = Estimate(
        tasks=total, startup_s=startup_s, ray_start_s=ray_start_s, prepare_s=prepare_s,
        fresh_process=fresh_process,
        growth_s=machine.growth_s(most - most_dry) if machine is not None else 0.0,
        measured={
            "others_cores": others, "probe_chains": probe.chains, "probe_wall_s": probe.wall_s,
            "probe_client_cpu_s": probe.client_cpu_s, "probe_box_cpu_s": probe.box_cpu_s,
            "model_per_image_s": per_image or 0.0, "actors": most, "actors_dry_run": most_dry,
            **({} if passed is None else {f"pass_{k}": v for k, v in asdict(passed).items()}),
        },
        stages=stage_rates(
            spec, total=total, probe=probe, pool_most=most, listing_page_s=timings.get("listing_page_s"),
            model_per_image_s=per_image, replicas=running_replicas(app),
            machine=machine,
        ),
    )  # fmt: skip
    log.info("preview: %s", estimate.summary())
    how = "the first ones" if first else f"drawn at random, seed {seed}"
    page = render(
        views, job=params.name, total=total, how=how, message=result.message, classes=classes,
        drops=drops, timings=timings, platform_name=platform_name, max_bytes=max_bytes, estimate=estimate,
        controls=controls,
    )  # fmt: skip
    if out is not None:
        page.save(out)
    return page


def labeling_controls(client: Any, project: int) -> list[dict[str, Any]]:
    """Label Studio's labeling-config controls (name, tag, the object they label, their labels),
    which the page shows beside the labels: a label is written through its control, by name. Empty
    on a platform with no labeling config (Synapse)."""
    info = getattr(client, "project_info", None)
    labeling = getattr(info(project), "labeling", None) if callable(info) else None
    if labeling is None:
        return []
    return [
        {"name": c.name, "tag": c.tag, "to_name": c.to_name, "labels": list(c.labels)}
        for c in labeling.controls
    ]


def _start(spec: RunSpec, client: Any, held: list[Any]) -> tuple[float, float, float, str | None, Any]:
    """Ray and the method's prepare, each timed before the dry run (see `preview.estimate`): the
    seconds Ray and Ray Data took to start in this process (about 0: both were up), the prepare's (the inference method: deploying its
    pre-processor; 0 when it was up), the CPUs the method's services hold, the app's name, and the
    method's annotator (`AnnotatorSpec`) on a dry-run spec, for the annotator pass (None: no prepare).
    The method's `close` goes on ``held``, for the caller to call when the preview is over.

    A prepare that fails is left for the dry run to report, with the run's own message."""
    from totask_ray.cluster import ensure_ray
    from totask_ray.methods.base import PrepareInput
    from totask_ray.run.driver import method_for

    o = spec.options
    t0 = time.perf_counter()
    ensure_ray(o.ray_address, verbose=o.verbose_ray)
    # Ray Data's import (seconds on a small node): a process pays it once, before its first dataset
    import ray.data  # noqa: F401

    ray_start_s = time.perf_counter() - t0
    method = method_for(spec)
    held.append(method.close)
    try:
        project = client.get_project(spec.params.project)
        collection = client.get_data_collection(project.data_collection)
        t1 = time.perf_counter()
        method.prepare(PrepareInput(spec.params, client, project, collection))
        prepare_s = time.perf_counter() - t1
        dry = replace(spec, options=o.model_copy(update={"dry_run": True}))
        annotator = method.annotator(dry)
    except Exception as exc:  # the dry run meets it again and fails with the run's own message
        log.debug("preview: the prepare before the dry run failed: %s", type(exc).__name__)
        return ray_start_s, 0.0, 0.0, None, None
    plan = getattr(method, "plan", None)
    return ray_start_s, prepare_s, annotator.reserved_cpus, getattr(plan, "app_name", None), annotator


def _pass(annotator: Any, ids: list[int], batch_size: int) -> Pass | None:
    """The annotator pass (`estimate.annotator_pass`), or None where it cannot run: the estimate
    then has no machine stage, and a preview never fails on it."""
    if annotator is None or not ids:
        return None
    try:
        return annotator_pass(annotator, ids, batch_size)
    except Exception as exc:
        log.warning("preview: the annotator pass for the estimate failed: %s", type(exc).__name__)
        return None


def _drops(params: ToTaskParams, client: Any, images: list[bytes], opts: RunOptions) -> Drops:
    """The drop counts, or a note saying why there are none: a preview never fails on them."""
    try:
        return count_drops(
            params, client, images, convention=opts.inference_convention,
            timeout_s=opts.inference_call_timeout_s,
        )  # fmt: skip
    except Exception as exc:  # a model that will not answer the probe: the page says so
        from totask_ray.net.redact import safe_error

        reason = safe_error(exc).splitlines()[0][:300]
        log.warning("preview: the drops could not be counted: %s", reason)
        return Drops(note=f"not counted: {reason}")
