"""How long the whole job will take on this cluster: start-up + tasks / the smallest stage capacity.

What goes in, all measured by the preview on this cluster, none assumed:

- **start-up**: the sample's dry run from its call to its first finished task, plus the time from
  its last finished task to its return (Ray Data's start, the actors' start, the first batch, and
  the pool's wind-down), read from the dry run's own report (`finished_at`). Starting Ray and the
  method's prepare (for the inference method: deploying the pre-processor) are timed apart, before
  the dry run: a run in the same process or on the same cluster finds both done (the preview's
  `start-up`), a run in a process of its own on a local Ray it starts (`totask-ray run` after
  `totask-ray preview`) pays both again (`fresh_process`).
- **stage capacities**, tasks a second, each from the run's own plan (`pipeline.sizing.plan_pool`
  on `read_cluster()`, as `pipeline.run.plan_actors` sizes it; the pre-processor's replicas as they
  run after the dry run):
  - listing: a page of ids per `listing_page_s`;
  - platform: a **write-cost probe that writes nothing** (`probe_platform`): a burst of the
    round-trips each task makes, through the async client and downloader the annotators use, at
    the run's concurrency (up to `PROBE_CONCURRENCY`): the task read, the primary file's download,
    and a second task read standing in for the write. The stand-in is fair because a write is, like
    the read, one authenticated round-trip to the same API server carrying one task's JSON, and
    under load what bounds both is the server's request rate, which a burst measures; it is a lower
    bound (a write also commits), which is why start-up, not the write, is what the estimate
    leans on for small jobs. Neither platform has a no-op write to time instead;
  - annotators: tasks in flight over the pool (`most` actors x two batches x `batch_size`, capped
    by `concurrency`) over one task's latency (the probe's round-trips plus its batch's model call);
  - pre-processor: its running replicas over the model's time per image in the sample's batch call.

The smallest capacity bounds the job; the page names it. What it cannot see: other work on a shared
cluster, a pool that grows onto nodes still to come, and the platform slowing as it fills.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from totask_ray.net.downloads import Downloader
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.connect import connect_async

PROBE_CONCURRENCY = 32  # the burst's round-trips in flight at most (one actor's default concurrency)
PROBE_CHAINS_PER_SLOT = 4  # chains per slot in flight: enough for the burst to reach its steady rate


@dataclass(frozen=True)
class StageRate:
    """One stage of the run: how many tasks a second it can take on this cluster, and from what."""

    name: str
    per_s: float
    how: str


@dataclass
class Estimate:
    """The whole job's projected wall time (see the module doc)."""

    tasks: int
    startup_s: float  # the dry run's start-up and wind-down, on a warm Ray with the method prepared
    ray_start_s: float  # starting Ray, when the preview had to
    prepare_s: float  # the method's prepare (the inference method: deploying its pre-processor)
    fresh_process: bool  # the run pays ray_start_s and prepare_s again (it is a process of its own)
    stages: list[StageRate] = field(default_factory=list)

    @property
    def bound(self) -> StageRate:
        return min(self.stages, key=lambda s: s.per_s)

    @property
    def work_s(self) -> float:
        return self.tasks / self.bound.per_s if self.stages else 0.0

    @property
    def start_s(self) -> float:
        return self.startup_s + (self.ray_start_s + self.prepare_s if self.fresh_process else 0.0)

    @property
    def projected_s(self) -> float:
        return self.start_s + self.work_s

    def summary(self) -> str:
        return f"Whole job: {self.tasks:,} tasks, about {duration(self.projected_s)} on this cluster, bound by {self.bound.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "bound": self.bound.name,
            "work_s": round(self.work_s, 3),
            "projected_s": round(self.projected_s, 3),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path


def duration(seconds: float) -> str:
    """`42 s`, `3.5 min`, `2.1 h`: what a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Probe:
    """The write-cost probe's burst: chains of round-trips (read, download, write stand-in)."""

    chains: int = 0
    wall_s: float = 0.0
    in_flight: int = 0
    latency_s: float = 0.0  # one chain's median latency under the burst
    errors: int = 0

    @property
    def per_s(self) -> float:
        return self.chains / self.wall_s if self.wall_s > 0 else math.inf


def probe_platform(spec: RunSpec, task_ids: list[int], in_flight: int) -> Probe:
    """The burst (see the module doc): nothing is written."""
    from totask_ray.preview.collect import run_async

    return run_async(_probe(spec, task_ids, max(1, min(in_flight, PROBE_CONCURRENCY))))


async def _probe(spec: RunSpec, task_ids: list[int], in_flight: int) -> Probe:
    client = connect_async(spec.platform)
    o = spec.options
    downloader = Downloader(spec.url_policy, timeout_s=o.download_timeout_s, headers=client.media_headers)
    sem = asyncio.Semaphore(in_flight)
    chains = max(len(task_ids), in_flight * PROBE_CHAINS_PER_SLOT)
    latencies: list[float] = []
    errors = 0

    async def chain(task_id: int) -> None:
        nonlocal errors
        async with sem:
            t0 = time.perf_counter()
            try:
                task = await client.get_task(task_id)
                unit = task.expanded_data_unit
                if (unit is None or not unit.files) and task.data_unit_id is not None:
                    unit = await client.get_data_unit(task.data_unit_id)
                primary = unit.primary_file() if unit is not None else None
                if primary is not None and primary.url:
                    await downloader.fetch_image(primary.url, max_bytes=o.max_image_bytes)
                await client.get_task(task_id)  # the write's stand-in: one more round-trip of a task
            except Exception:  # a task the run would fail: its time still counts, the page says how many
                errors += 1
            latencies.append(time.perf_counter() - t0)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(chain(task_ids[i % len(task_ids)]) for i in range(chains)))
        wall = time.perf_counter() - t0
    finally:
        for closer in (getattr(downloader, "aclose", None), getattr(client, "aclose", None)):
            if closer is not None:
                await closer()
    return Probe(chains, wall, in_flight, statistics.median(latencies), errors)


def dry_run_startup(records: list[dict[str, Any]], started: float, ended: float) -> float:
    """The dry run's time outside its tasks: from its call (unix time `started`) to its first
    finished task, and from its last to its return (`ended`); the whole run when none finished."""
    finished = [float(r["finished_at"]) for r in records if r.get("finished_at")]
    if not finished:
        return ended - started
    return max(0.0, min(finished) - started) + max(0.0, ended - max(finished))


def stage_rates(
    spec: RunSpec,
    *,
    total: int,
    probe: Probe,
    pool_most: int,
    listing_page_s: float | None,
    model_per_image_s: float | None,
    replicas: int,
) -> list[StageRate]:
    """Each stage's capacity in tasks a second (see the module doc)."""
    from totask_ray.pipeline.run import IN_FLIGHT_PER_ACTOR

    o, p = spec.options, spec.params
    out: list[StageRate] = []
    if listing_page_s:
        out.append(StageRate("listing", o.page_size / listing_page_s, f"{o.page_size} ids a page"))
    out.append(
        StageRate(
            "platform (task read, file download, write)",
            probe.per_s,
            f"a burst of {probe.chains} read-download-read chains, {probe.in_flight} in flight",
        )
    )
    batch = min(p.batch_size, max(total, 1))
    call_s = batch * model_per_image_s if model_per_image_s else 0.0
    in_flight = pool_most * min(o.concurrency, IN_FLIGHT_PER_ACTOR * batch)
    latency = probe.latency_s + call_s
    if latency > 0:
        out.append(
            StageRate(
                "annotator actors",
                in_flight / latency,
                f"{pool_most} actor(s), {in_flight} tasks in flight, {latency * 1000:.0f} ms a task",
            )
        )
    if model_per_image_s:
        out.append(
            StageRate(
                "pre-processor",
                replicas / model_per_image_s,
                f"{replicas} replica(s), {model_per_image_s * 1000:.0f} ms an image",
            )
        )
    return out


def pool_most(spec: RunSpec, total: int, reserved_cpus: float) -> int:
    """The most annotator actors the run would use: the run's own plan on the cluster now."""
    from totask_ray.pipeline.sizing import plan_pool
    from totask_ray.serving.capacity import read_cluster

    o = spec.options
    plan = plan_pool(
        read_cluster(o.declared_node_types()),
        actor_cpus=o.actor_cpus,
        batches=math.ceil(total / spec.params.batch_size),
        num_actors=o.num_actors,
        max_actors=o.max_actors,
        reserved_cpus=reserved_cpus,
    )
    return plan.most


def running_replicas(app_name: str | None) -> int:
    """The pre-processor's replicas running now (at least one: the sample's call was answered)."""
    if app_name is None:
        return 1
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # Serve's status is a hint here; one replica answered the probe
        return 1
    if app is None:
        return 1
    counts = [
        sum(n for state, n in d.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")
        for d in app.deployments.values()
    ]
    return max(1, max(counts, default=1))
