"""How long the whole job will take on this cluster: start-up + tasks / the smallest stage capacity.

What goes in, measured by the preview on this cluster, and what is assumed (the page says which):

- **start-up**: the sample's dry run from its call to its first finished task, plus the time from
  its last finished task to its return (Ray Data's start, the actors' start, the first batch, and
  the pool's wind-down), read from the dry run's own report (`finished_at`). Starting Ray and the
  method's prepare (for the inference method: deploying the pre-processor) are timed apart, before
  the dry run: a run in the same process or on the same cluster finds both done (the preview's
  `start-up`), a run in a process of its own on a local Ray it starts (`totask-ray run` after
  `totask-ray preview`) pays both again (`fresh_process`). Where the cluster is this machine, the
  pool's growth past the dry run's (`Machine.growth_s`: actors x `ACTOR_START_CPU_S`, assumed) is
  added: on a small machine those actors' imports are seconds of its CPU.
- **stage capacities**, tasks a second, each from the run's own plan (`pipeline.sizing.plan_pool`
  on `read_cluster()`, as `pipeline.run.plan_actors` sizes it; the pre-processor's replicas as they
  run after the dry run):
  - listing: a page of ids per `listing_page_s`;
  - platform: a **probe that writes nothing** (`probe_platform`): a burst of the round-trips each
    task makes, through the async client and downloader the annotators use, at the run's
    concurrency (up to `PROBE_CONCURRENCY`): the task read, the primary file's download, and a
    second task read standing in for the write (assumed: a write costs the server what a read does;
    neither platform has a write that writes nothing, to time instead);
  - annotators: tasks in flight over the pool (`most` actors x two batches x `batch_size`, capped
    by `concurrency`) over one task's latency (the probe's round-trips plus its batch's model call);
  - pre-processor: its running replicas over the model's time per image in the sample's batch call;
  - this machine's CPUs (`Machine`), where the cluster is this machine: its cores, shared with the
    load measured while the preview waited, over a task's CPU: the run's own annotator over the
    sample in this process (`annotator_pass`), measured as this machine's CPU (client, model,
    platform when local), times `RAY_DATA_CPU_FACTOR` (assumed). What bounded the demos on a 2-core
    box (bench/estimate.py): the per-stage latencies were far from it, the CPUs were saturated.

The smallest capacity bounds the job; the page names it. What it cannot see: other work on a shared
cluster that starts or stops after the preview, a pool that grows onto nodes still to come, and the
platform slowing as it fills.
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
    # False: shown, but its capacity is a share of another stage's (a platform on this machine is
    # its CPUs'), so it does not bound the job apart from it
    binds: bool = True


@dataclass
class Estimate:
    """The whole job's projected wall time (see the module doc)."""

    tasks: int
    startup_s: float  # the dry run's start-up and wind-down, on a warm Ray with the method prepared
    ray_start_s: float  # starting Ray, when the preview had to
    prepare_s: float  # the method's prepare (the inference method: deploying its pre-processor)
    fresh_process: bool  # the run pays ray_start_s and prepare_s again (it is a process of its own)
    stages: list[StageRate] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)  # what the CPU stage was taken from
    growth_s: float = 0.0  # the pool growing past the dry run's: its actors starting (`Machine`)

    @property
    def bound(self) -> StageRate:
        return min((s for s in self.stages if s.binds), key=lambda s: s.per_s)

    @property
    def work_s(self) -> float:
        return self.tasks / self.bound.per_s if self.stages else 0.0

    @property
    def start_s(self) -> float:
        fresh = self.ray_start_s + self.prepare_s if self.fresh_process else 0.0
        return self.startup_s + self.growth_s + fresh

    @property
    def projected_s(self) -> float:
        return self.start_s + self.work_s

    def summary(self) -> str:
        return (
            f"Whole job (est.): {self.tasks:,} tasks, about {duration(self.projected_s)} on this cluster, "
            f"bound by {self.bound.name}"
        )

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
    client_cpu_s: float = 0.0  # this process's CPU over the burst: the client's side of it
    box_cpu_s: float = 0.0  # this machine's busy CPU over the burst, everything on it

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
        t0, c0, b0 = time.perf_counter(), time.process_time(), box_busy_s()
        await asyncio.gather(*(chain(task_ids[i % len(task_ids)]) for i in range(chains)))
        wall = time.perf_counter() - t0
        cpu, box = time.process_time() - c0, box_busy_s() - b0
    finally:
        for closer in (getattr(downloader, "aclose", None), getattr(client, "aclose", None)):
            if closer is not None:
                await closer()
    return Probe(chains, wall, in_flight, statistics.median(latencies), errors, cpu, box)


IDLE_S = 1.0  # how long the preview watches this machine while it does nothing


def others_cores(idle_s: float = IDLE_S) -> float:
    """The cores this machine keeps busy while the preview does nothing: other people's work and
    Ray's own upkeep, which the run will share the machine with."""
    b0, t0 = box_busy_s(), time.perf_counter()
    time.sleep(idle_s)  # a measurement window, not a wait for a condition
    return max(0.0, (box_busy_s() - b0) / (time.perf_counter() - t0))


def box_busy_s() -> float:
    """This machine's CPU seconds spent busy since boot, over all its cores (psutil)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


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
    machine: Machine | None = None,
) -> list[StageRate]:
    """Each stage's capacity in tasks a second (see the module doc)."""
    from totask_ray.pipeline.run import IN_FLIGHT_PER_ACTOR

    o, p = spec.options, spec.params
    out: list[StageRate] = []
    if listing_page_s:
        out.append(StageRate("listing", o.page_size / listing_page_s, f"{o.page_size} ids a page"))
    # A platform on this machine, with the machine as a stage: the burst ran on cores that other load
    # held too, and the machine stage counts its server's CPU (in the pass's and the probe's)
    shared = machine is not None and platform_here(spec)
    out.append(
        StageRate(
            "platform (task read, file download, write)",
            probe.per_s,
            f"a burst of {probe.chains} read-download-read chains, {probe.in_flight} in flight"
            + (" (the platform runs on this machine: its CPUs bound it)" if shared else ""),
            binds=not shared,
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
    if machine is not None:
        out.append(machine.rate())
    return out


@dataclass(frozen=True)
class Machine:
    """This machine's CPUs as a stage, where the run's whole cluster is this machine (a local Ray):
    the annotators, the driver, Ray's own processes, the pre-processor's replicas and, when it is
    local too, the platform's server all share its cores, so together they take no more than its
    free cores over the CPU a task costs them all.

    - free cores: its cores less what it keeps busy while the preview does nothing (`others_cores`:
      other people's work, Ray's upkeep), measured just before the probe;
    - a task's CPU: the annotator pass (`annotator_pass`: the run's own annotator class, in this
      process, over the sample as a dry run: reads, downloads, the model's calls, hooks,
      validation), as this machine's CPU per task less the idle rate, plus one task read's CPU for
      the write it leaves out (the probe's per round-trip), times `RAY_DATA_CPU_FACTOR` for what the
      pass has no part of (Ray Data moving ids and outcomes, the driver taking them, a pool that
      grows by starting actors).
    """

    cores: float
    others: float
    pass_cpu_s: float  # the annotator pass's CPU on this machine per task, less the idle rate
    write_cpu_s: float  # one round-trip's CPU (the probe's), standing in for the write
    busy: int = 1  # the run's processes that compete for the cores: its actors and the driver

    @property
    def task_cpu_s(self) -> float:
        return (self.pass_cpu_s + self.write_cpu_s) * RAY_DATA_CPU_FACTOR

    @property
    def free(self) -> float:
        """The cores the run gets: the kernel shares them between runnable processes, so against a
        load of `others` cores the run's `busy` processes get their share of them (all of them on an
        idle machine)."""
        return max(MIN_FREE_CORES, self.cores * self.busy / (self.busy + self.others))

    def growth_s(self, actors: int) -> float:
        """Starting `actors` more annotator actors than the sample's dry run did (the pool grows to
        its plan): each imports Ray Data and the method, `ACTOR_START_CPU_S` of CPU on these cores."""
        return max(0, actors) * ACTOR_START_CPU_S / self.free

    def rate(self) -> StageRate:
        how = (
            f"est. {self.free:.1f} of {self.cores:g} cores for the run, {self.task_cpu_s * 1000:.0f} ms CPU a task "
            f"(sample pass {self.pass_cpu_s * 1000:.0f} ms + write {self.write_cpu_s * 1000:.1f} ms, "
            f"x{RAY_DATA_CPU_FACTOR:g} for Ray Data)"
        )
        return StageRate(MACHINE_STAGE, self.free / max(self.task_cpu_s, 1e-6), how)


MACHINE_STAGE = "the CPUs of this machine"
# What a run costs in CPU beyond the annotator pass's per task: Ray Data's streaming of ids and
# outcomes, the driver's share, the pool's actors starting as it grows. Measured on a 2-core box
# with the embedded platform (bench/estimate.py, BENCHMARKS); an assumption elsewhere, said on the page.
RAY_DATA_CPU_FACTOR = 1.7
# An annotator actor's start: a Python process importing Ray Data, the client and the method. Fitted on
# the 2-core box (bench/estimate.py: the file runs' time beyond the dry run's start-up and the work,
# over the actors the pool added, median 1.2 CPU-s an actor), then checked on a second round there.
# An assumption elsewhere; the page says so.
ACTOR_START_CPU_S = 1.2
MIN_FREE_CORES = 0.25  # a machine busier than its cores still gives the run a share of them
PASS_ROUNDS = 2  # the annotator pass goes over the sample this many times, after one warm-up batch


def platform_here(spec: RunSpec) -> bool:
    """The platform's server is on this machine (its URL's host is a loopback address)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(str(getattr(spec.platform, "host", "") or "")).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_cluster() -> bool:
    """The run's cluster is one node, this machine (a local Ray): the machine stage applies."""
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        here = ray.util.get_node_ip_address()
    except Exception:  # no Ray to ask: no machine stage, the other stages still bound the job
        return False
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == here


@dataclass
class Pass:
    """The annotator pass (see `Machine`)."""

    tasks: int = 0
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    box_cpu_s: float = 0.0


def annotator_pass(annotator: Any, ids: list[int], batch_size: int) -> Pass:
    """The run's own annotator (`AnnotatorSpec`, built on a dry-run spec: nothing is written) in this
    process, over the sample `PASS_ROUNDS` times in batches, two batches in flight as an actor
    takes them, after one warm-up batch (sessions, the handle's router)."""
    from totask_ray.preview.collect import run_async

    return run_async(_pass(annotator, ids, batch_size))


async def _pass(annotator: Any, ids: list[int], batch_size: int) -> Pass:
    import numpy as np

    from totask_ray.pipeline.run import IN_FLIGHT_PER_ACTOR

    ann = annotator.cls(**annotator.kwargs)
    size = max(1, min(batch_size, len(ids)))
    work = [ids[i % len(ids)] for i in range(len(ids) * PASS_ROUNDS)]
    batches = [work[i : i + size] for i in range(0, len(work), size)]
    sem = asyncio.Semaphore(IN_FLIGHT_PER_ACTOR)

    async def batch(b: list[int]) -> None:
        async with sem:
            await ann({"task_id": np.array(b, dtype=np.int64)})

    try:
        await batch(ids[:size])  # warm-up, not counted
        t0, c0, b0 = time.perf_counter(), time.process_time(), box_busy_s()
        await asyncio.gather(*(batch(b) for b in batches))
        out = Pass(len(work), time.perf_counter() - t0, time.process_time() - c0, box_busy_s() - b0)
    finally:
        for closer in (getattr(ann._downloader, "aclose", None), getattr(ann._client, "aclose", None)):
            if closer is not None:
                await closer()
        ann._threads.shutdown(wait=False)
    return out


def this_machine(probe: Probe, passed: Pass | None, others: float, busy: int = 1) -> Machine | None:
    """The machine stage where the cluster is this machine and the pass ran (see `Machine`)."""
    import os

    if passed is None or not passed.tasks or not local_cluster():
        return None
    pass_cpu = max(0.0, passed.box_cpu_s - others * passed.wall_s) / passed.tasks
    write_cpu = max(0.0, probe.box_cpu_s - others * probe.wall_s) / max(probe.chains, 1) / 3
    return Machine(
        cores=float(os.cpu_count() or 1), others=others, pass_cpu_s=pass_cpu, write_cpu_s=write_cpu
    )


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
