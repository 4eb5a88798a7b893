"""Replica sizing: a run plans its pre-processor's replicas and model threads on the free capacity.

The plan is a pure function on per-node capacities (`capacity.plan_replicas`); the lifecycle applies
it on the real session cluster (4 logical CPUs, 1 logical GPU) and Serve ends with that many replicas.
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
from ray import serve

from totask_ray.serving.capacity import ReplicaPlan, pack, plan_replicas
from totask_ray.serving.config import PreProcessorRelease, parse_release_config
from totask_ray.serving.lifecycle import (
    RayServeBackend,
    _model_takes_threads,
    ensure_running,
    plan_for,
)
from totask_ray.serving.resources import DeploymentArgs, Resources


@serve.deployment
class Sized:
    async def predict(self, images: list, params: dict) -> list:
        return [[] for _ in images]


def build_sized(args: dict) -> serve.Application:
    return Sized.options(**DeploymentArgs.model_validate(args).deployment_options()).bind()


def release(code: str, *, cpus: float = 1, gpus: float = 0, **serve_options) -> PreProcessorRelease:
    cfg = {
        "code": code,
        "name": code,
        "version": "0.1.0",
        "actions": {
            "inference": {"required_resources": {"required_cpu_count": cpus, "required_gpu_count": gpus}},
            "deployment": {"entrypoint": f"{__name__}:build_sized", "serve_options": serve_options},
        },
    }
    return PreProcessorRelease.from_config(parse_release_config(cfg))


# ------------------------------------------------------------------ the plan, on capacities


def test_a_two_cpu_node_holds_one_replica_and_gives_it_both_cores():
    plan = plan_replicas({"CPU": 1}, [{"CPU": 2}], cores=2)
    # 2 x 1 CPU + a 0.5-CPU decode actor + the reads' 0.1 do not fit 2 CPUs: one replica, two threads
    assert (plan.replicas, plan.planned, plan.threads, plan.decode_actors) == (1, True, 2, 1)
    line = plan.describe("faces@1")
    assert "\n" not in line
    assert line.startswith(
        "pre-processor faces@1: 1 replica x 1 CPU (planned: 1 fit now, up to 1 once the cluster has grown), 2 model"
    )


def test_more_free_cpus_more_replicas_with_room_for_their_decode_actors():
    plan = plan_replicas({"CPU": 1}, [{"CPU": 4}], cores=2)
    assert (plan.replicas, plan.threads) == (2, None)  # one thread each: as many as they reserve
    assert plan.decode_actors >= math.ceil(plan.replicas / 2)
    # at most half of what is free: the replicas outlive the run, other runs need room beside them
    assert plan_replicas({"CPU": 1}, [{"CPU": 8}, {"CPU": 8}]).replicas == 8
    assert plan_replicas({"CPU": 1}, [{"CPU": 2.5}]).replicas == 1  # a cluster already half used
    # no constant caps it: 64 free CPUs start 32 replicas, and the grown cluster (here the same 64)
    # holds 50 beside their decode actors (50 + 25 x 0.5 + 0.1 for the reads <= 64)
    big = plan_replicas({"CPU": 1}, [{"CPU": 64}])
    assert (big.replicas, big.max_replicas) == (32, 50)


def test_a_fixed_count_is_kept_and_only_threads_are_planned():
    plan = plan_replicas({"CPU": 1}, [{"CPU": 4}], fixed=1, cores=4)
    assert (plan.replicas, plan.planned, plan.threads) == (1, False, 4)
    assert "fixed by the release" in plan.describe("x@1")
    # a release's count the cluster cannot hold stays as it is: the capacity gate answers for it
    assert plan_replicas({"CPU": 1}, [{"CPU": 2}], fixed=5).replicas == 5


def test_a_gpu_release_on_one_gpu_plans_one_replica():
    plan = plan_replicas({"CPU": 1, "GPU": 1}, [{"CPU": 4, "GPU": 1}])
    assert plan.replicas == 1 and plan.planned
    assert plan_replicas({"CPU": 1, "GPU": 1}, [{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]).replicas == 2


def test_nothing_free_plans_one_replica_for_the_gate_to_judge():
    plan = plan_replicas({"CPU": 1}, [{"CPU": 0.5}])
    assert (plan.replicas, plan.decode_actors, plan.threads) == (1, 0, None)


@pytest.mark.parametrize(
    ("bundle", "decode"),
    [({"CPU": 1}, 0.5), ({"CPU": 0.5}, 0.25), ({"CPU": 2, "memory": 2.0}, 0.5), ({"CPU": 1, "GPU": 0.5}, 1)],
)
def test_the_plan_never_exceeds_the_free_capacity(bundle, decode):
    for cpus, gpus, nodes in itertools.product((0.5, 1, 2, 3, 4, 7.5, 16), (0, 1, 2), (1, 2, 3)):
        available = [{"CPU": cpus, "GPU": gpus, "memory": 8.0}] * nodes
        plan = plan_replicas(bundle, available, decode_cpus=decode)
        if pack(bundle, 1, available) == 0:
            assert plan.replicas == 1  # nothing fits: one, for the gate
            continue
        assert pack(bundle, plan.replicas, available) == plan.replicas
        # the replicas fit with their decode actors (one per two replicas), unless not even one does
        # (then one replica: the pipeline says there is no room for its decode actor)
        assert plan.decode_actors >= math.ceil(plan.replicas / 2) or plan.replicas == 1
        # one more replica would not have fitted with its decode actors
        more = plan_replicas(bundle, available, decode_cpus=decode, fixed=plan.replicas + 1)
        assert (
            more.decode_actors < math.ceil((plan.replicas + 1) / 2)
            or (pack(bundle, plan.replicas + 1, available) < plan.replicas + 1)
            # or it would have taken more than half of the free CPUs (the replicas outlive the run)
            or (plan.replicas + 1) * bundle.get("CPU", 0) > cpus * nodes / 2 + 1e-6
        )


def test_releases_that_fix_their_count():
    assert not Resources.from_required({}).fixes_replicas(release("a").config.serve_options)
    assert Resources.from_required({"num_replicas": 2}).fixes_replicas(None)
    assert Resources.from_required({}).fixes_replicas(release("b", num_replicas=3).config.serve_options)
    auto = release("c", autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert Resources.from_required({}).fixes_replicas(auto.config.serve_options)


def test_threads_go_only_to_a_shared_deployment_whose_model_takes_them():
    from serve_apps.faces.app import build_app

    assert _model_takes_threads(build_app())
    assert not _model_takes_threads(build_sized(DeploymentArgs().model_dump()))


# ------------------------------------------------------------------ on the real session cluster


@pytest.fixture
def backend(ray_cluster):
    b = RayServeBackend(delete_timeout_s=30)
    created: list[str] = []
    yield b, created
    for name in created:
        b.delete(name)


def _replicas(app_name: str) -> int:
    app = serve.status().applications[app_name]
    (dep,) = app.deployments.values()
    return sum(n for state, n in dep.replica_states.items() if getattr(state, "value", state) == "RUNNING")


def _settled(app_name: str, want: int, timeout_s: float = 20) -> int:
    deadline = time.monotonic() + timeout_s
    while (got := _replicas(app_name)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


@pytest.mark.slow
def test_a_run_deploys_the_planned_count(backend):
    b, created = backend
    rel = release("sized")
    free = b.cluster_snapshot()
    expected, _ = plan_for(rel, Resources.from_required({"required_cpu_count": 1}), free, decode_cpus=0.5)
    created.append(rel.app_name)
    result = ensure_running(rel, b, poll_interval_s=0.2, timeout_s=60, size_replicas=True)
    assert isinstance(result.plan, ReplicaPlan) and result.plan.planned
    assert result.plan.replicas == expected.replicas
    assert result.capacity is not None and result.capacity.replicas == result.plan.replicas
    assert _settled(rel.app_name, result.plan.replicas) == result.plan.replicas
    # within the free capacity, leaving the decode actors theirs
    assert pack({"CPU": 1}, result.plan.replicas, free.available) == result.plan.replicas
    if sum(n.get("CPU", 0) for n in free.available) >= 4:  # a quiet session cluster: 2 x 1 CPU + decode
        assert result.plan.replicas == 2


@pytest.mark.slow
def test_a_release_that_fixes_num_replicas_keeps_it(backend):
    b, created = backend
    rel = release("fixed", num_replicas=1)
    created.append(rel.app_name)
    result = ensure_running(rel, b, poll_interval_s=0.2, timeout_s=60, size_replicas=True)
    assert result.plan is not None and not result.plan.planned and result.plan.replicas == 1
    assert _settled(rel.app_name, 1) == 1


@pytest.mark.slow
def test_without_sizing_the_release_count_or_one_is_deployed(backend):
    b, created = backend
    rel = release("unsized")
    created.append(rel.app_name)
    result = ensure_running(rel, b, poll_interval_s=0.2, timeout_s=60)
    assert result.plan is None and result.capacity is not None and result.capacity.replicas == 1
    assert _settled(rel.app_name, 1) == 1


def test_a_gpu_release_on_the_one_gpu_cluster_plans_one_replica(backend):
    b, _ = backend
    rel = release("gpu", cpus=1, gpus=1)
    plan, _ = plan_for(rel, Resources.from_required({"required_cpu_count": 1, "required_gpu_count": 1}),
                    b.cluster_snapshot(), decode_cpus=0.5)  # fmt: skip
    assert plan.replicas == 1 and plan.planned


def _stays_at_least(app_name: str, want: int, seconds: float) -> list[int]:
    """The app's running replicas, read every 0.2 s for ``seconds`` (a hold is a duration to watch)."""
    seen, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        seen.append(_replicas(app_name))
        time.sleep(0.2)
    return seen


@pytest.mark.slow
def test_a_run_holds_its_idle_replicas_and_a_lapsed_hold_lets_them_scale_to_zero(backend):
    """The GPU-pool-from-zero hang: a planned app scaled to zero while the run's pool was still
    starting, and the pool's actors took the CPUs its replica needed. Serve counts idleness from
    the moment the replicas run, so with no lease the app goes to zero with no request ever sent
    (the control); with one, it keeps the plan over many downscale delays; and a lease no longer
    renewed (a killed driver's) lapses and the app scales to zero as Serve alone would."""
    from totask_ray.serving.hold import Lease
    from totask_ray.serving.lifecycle import Scaling

    b, created = backend
    scaling = Scaling(downscale_delay_s=0.5)
    unheld = release("unheld", cpus=0.5)
    created.append(unheld.app_name)
    ensure_running(unheld, b, poll_interval_s=0.2, timeout_s=60, size_replicas=True, scaling=scaling)
    assert _settled(unheld.app_name, 0, timeout_s=30) == 0, "an idle planned app did not scale to zero"
    b.delete(unheld.app_name)

    held = release("held", cpus=0.5)
    created.append(held.app_name)
    lease = Lease(held.app_name, ttl_s=6, renew_every_s=1).take()  # before it runs, as a run takes it
    try:
        result = ensure_running(
            held, b, poll_interval_s=0.2, timeout_s=60, size_replicas=True, scaling=scaling
        )
        assert result.plan is not None and result.plan.planned
        want = result.plan.replicas
        assert _settled(held.app_name, want) == want
        seen = _stays_at_least(held.app_name, want, 4)  # 8 downscale delays, no request
        assert min(seen) == want, f"held replicas went below the plan of {want}: {seen}"
        lease._stop.set()  # renewals stop, as when the driver is killed: the lease lapses after its TTL
        t0 = time.monotonic()
        assert _settled(held.app_name, 0, timeout_s=40) == 0, "a lapsed hold kept the replicas"
        assert time.monotonic() - t0 > 3, (
            "the replicas went before the lease lapsed (6 s TTL, renewed 1 s apart)"
        )
    finally:
        lease.release()


@pytest.mark.slow
def test_a_run_finding_its_planned_app_at_zero_wakes_it_before_its_pool_starts(backend):
    """An earlier run's app, scaled to zero since: the next run's lease brings a replica back with no
    request sent, and prepare waits for it (`hold.wake`), so the pool that starts next does not race
    the replica for a node. An app with a replica running has nothing to wait for."""
    from totask_ray.serving.hold import Lease, holds_by_lease, wake
    from totask_ray.serving.lifecycle import Scaling

    b, created = backend
    rel = release("woken", cpus=0.5)
    created.append(rel.app_name)
    ensure_running(
        rel, b, poll_interval_s=0.2, timeout_s=60, size_replicas=True, scaling=Scaling(downscale_delay_s=0.5)
    )
    assert _settled(rel.app_name, 0, timeout_s=30) == 0
    assert holds_by_lease(rel.app_name)
    lease = Lease(rel.app_name).take()
    try:
        assert wake(rel.app_name, timeout_s=60) is True, "the held app found at zero did not wake"
        assert _replicas(rel.app_name) >= 1
        assert wake(rel.app_name, timeout_s=60) is None  # a replica runs: nothing to wait for
    finally:
        lease.release()
