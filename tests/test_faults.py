"""Exact accounting under faults: a killed Data actor, a killed Serve replica, a flaky platform
(503/429 with Retry-After), a platform slower than the client's timeout, and a platform restart.

After each run: every task has exactly one outcome, success + failed == total, the platform's write
history agrees with the report (no task missing, nothing written twice with different content), and
a `resume` re-run finishes what is left. Faults are real: processes are killed with SIGKILL, the
platform process is restarted, and the platform's own fault mode (enabled only in tests) answers
errors before its handlers run or delays answers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import config_for, faces_release, good_unit, make_project, png, read_report, wait_until

from totask_ray import run_to_task
from totask_ray.result import RunStatus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

FILE = {"name": "Fault_Job", "target_specification_name": "annotation_data"}


@pytest.fixture(autouse=True)
def _clear(platform):
    yield
    platform.clear_faults()


def _project(platform, n: int, prefix: str) -> tuple[int, list[int], dict[int, dict]]:
    units = [good_unit(platform, i, prefix) for i in range(n)]
    project, ids = make_project(platform, units)
    return project, ids, {tid: u["expected"] for tid, u in zip(ids, units, strict=True)}


def check_accounting(
    platform, ids: list[int], expected: dict[int, dict], report: Path, result
) -> dict[int, dict]:
    """The invariants every faulted run must keep; returns the report's outcomes."""
    outcomes = read_report(report)  # also asserts: at most one outcome per task
    assert sorted(outcomes) == sorted(ids), "every task has exactly one outcome"
    # a task re-run after a fault finds its data already there: `unchanged`, not written again
    done = result.success_count + result.unchanged_count
    assert done + result.failed_count == result.total_tasks == len(ids)
    assert result.metrics.stand_by == 0
    assert sum(o["status"] == "success" for o in outcomes.values()) == result.success_count
    assert sum(o["status"] == "unchanged" for o in outcomes.values()) == result.unchanged_count
    writes = platform.store.history_counts(task_ids=ids)
    print(f"\n[fault summary] tasks={len(ids)} success={result.success_count} unchanged={result.unchanged_count} "
          f"failed={result.failed_count} "
          f"written_twice_same_content={sum(1 for v in writes.values() if v > 1)}")  # fmt: skip
    store = platform.store
    for tid in ids:
        history = store.history(tid)
        contents = {json.dumps(h["data"], sort_keys=True) for h in history}
        assert len(contents) <= 1, f"task {tid} was written with different contents"
        if outcomes[tid]["status"] == "success":
            assert history, f"task {tid} is reported written but the platform has no write"
            assert store.get_task(tid)["data"] == expected[tid]
        elif history:  # a failed task may have been written by a request whose answer was lost
            assert store.get_task(tid)["data"] == expected[tid]
    return outcomes


def rerun_finishes(
    platform, project: int, ids: list[int], expected: dict, report: Path, tmp_path: Path, **opts
) -> None:
    first = read_report(report)
    todo = {t for t, o in first.items() if o["status"] != "success"}
    second = tmp_path / "resume.jsonl"
    result = run_to_task(
        {**FILE, "project": project}, platform=config_for(platform), report=second, resume=report,
        progress_bar=False, **opts,
    )  # fmt: skip
    redone = read_report(second)
    assert set(redone) == todo, "the re-run processes exactly the tasks the first run did not finish"
    print(
        f"[fault summary] re-run: tasks={len(redone)} success={result.success_count} failed={result.failed_count}"
    )
    assert result.failed_count == 0
    for tid in ids:
        assert platform.store.get_task(tid)["data"] == expected[tid]


def run_in_background(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for_writes(platform, ids: list[int], at_least: int, timeout: float = 120.0) -> None:
    wait_until(
        lambda: len(platform.store.history_counts(task_ids=ids)) >= at_least,
        f"at least {at_least} of the {len(ids)} tasks to be written",
        timeout,
        interval=0.05,
    )


def kill_processes(title_part: str) -> int:
    """SIGKILL this suite's Ray workers whose process title contains `title_part`.

    Only descendants of this process (its `ray.init` started the raylet that started them): other
    Ray clusters on the machine are never touched.
    """
    killed = 0
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title_part in cmd:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
    return killed


def replica_pids(app: str) -> dict[str, int]:
    """The live replicas of Serve app `app` as Ray's GCS knows them, actor id -> worker pid (a
    process title can lag behind the actor it hosts; the actor table cannot)."""
    from ray._private import state

    return {
        actor_id: info["Pid"]
        for actor_id, info in state.actors().items()
        if info["State"] == "ALIVE"
        and info["ActorClassName"].startswith(f"ServeReplica:{app}:")
        and info["Pid"]
    }


def kill_replicas(app: str) -> list[int]:
    """SIGKILL every live replica of `app`; returns their pids once each is gone."""
    pids = sorted(
        wait_until(lambda: replica_pids(app), f"a live replica of Serve app {app}", timeout=60).values()
    )
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not any(_alive(pid) for pid in pids),
        f"the killed replica processes {pids} to exit",
        timeout=30,
    )
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_platform_answers_503_and_429_for_one_request_in_ten(platform, tmp_path):
    project, ids, expected = _project(platform, 300, "f503")
    platform.set_faults(
        error_rate=0.1,
        statuses=[503, 429],
        retry_after_s=0.05,
        seed=3,
        path_regex="^/(tasks|media)/",
        max_in_a_row=3,  # fewer than the 4 retries of downloads and 5 of platform calls: none is exhausted
    )
    report = tmp_path / "r.jsonl"
    cfg = config_for(platform, backoff_s=0.05)
    result = run_to_task(
        {**FILE, "project": project}, platform=cfg, report=report, num_actors=2, progress_bar=False
    )
    stats = platform.fault_stats()["stats"]
    platform.clear_faults()
    assert stats["errors"] > 50  # the fault really happened, on hundreds of requests
    check_accounting(platform, ids, expected, report, result)
    assert result.status is RunStatus.SUCCEEDED and result.failed_count == 0  # retries absorbed every one
    # errors are answered before the handler runs: each task was written exactly once
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}


def test_platform_slower_than_the_client_timeout(platform, tmp_path):
    project, ids, expected = _project(platform, 200, "fslow")
    platform.set_faults(slow_rate=0.05, slow_s=2.5, seed=5, path_regex="^/tasks/")
    report = tmp_path / "r.jsonl"
    cfg = config_for(platform, read_timeout_s=1.0, backoff_s=0.05, retries=3)
    result = run_to_task(
        {**FILE, "project": project}, platform=cfg, report=report, num_actors=2, progress_bar=False
    )
    slowed = platform.fault_stats()["stats"]["slowed"]
    platform.clear_faults()
    assert slowed > 5
    outcomes = check_accounting(platform, ids, expected, report, result)
    # A timed-out PUT may still be applied after the client gave up, then replayed: same content.
    assert max(platform.store.history_counts(task_ids=ids).values()) >= 1
    if result.failed_count:
        assert all("timed out" in o["error"] for o in outcomes.values() if o["status"] == "failed")
        rerun_finishes(platform, project, ids, expected, report, tmp_path, num_actors=1)


def test_platform_restarted_mid_run(platform, tmp_path):
    project, ids, expected = _project(platform, 400, "frestart")
    platform.set_faults(slow_rate=1.0, slow_s=0.02, path_regex="^/media/")  # long enough to restart mid-run
    report = tmp_path / "r.jsonl"
    cfg = config_for(platform, backoff_s=0.3, retries=6)
    thread, box = run_in_background(
        lambda: run_to_task(
            {**FILE, "project": project},
            platform=cfg,
            report=report,
            num_actors=2,
            concurrency=8,
            progress_bar=False,
        )
    )
    wait_for_writes(platform, ids, 40)
    old_pid = platform.pid
    platform.restart()  # faults are not carried over: the new process starts clean
    assert platform.pid != old_pid
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    result = box["result"]
    check_accounting(platform, ids, expected, report, result)
    if result.failed_count:
        rerun_finishes(platform, project, ids, expected, report, tmp_path, num_actors=1)


def test_data_actor_killed_mid_run(platform, tmp_path):
    project, ids, expected = _project(platform, 400, "fkill")
    platform.set_faults(slow_rate=1.0, slow_s=0.03, path_regex="^/media/")
    report = tmp_path / "r.jsonl"
    thread, box = run_in_background(
        lambda: run_to_task(
            {**FILE, "project": project},
            platform=config_for(platform),
            report=report,
            num_actors=2,
            concurrency=4,
            progress_bar=False,
        )
    )
    wait_for_writes(platform, ids, 60)
    wait_until(
        lambda: kill_processes("MapBatches(FileAnnotator)"), "a Data actor process to kill", timeout=30
    )
    thread.join(timeout=300)
    platform.clear_faults()
    assert "error" not in box, box.get("error")
    result = box["result"]
    check_accounting(platform, ids, expected, report, result)
    if result.failed_count:
        rerun_finishes(platform, project, ids, expected, report, tmp_path, num_actors=1)


def _small_face_png() -> bytes:
    from PIL import Image
    from skimage import data

    return png(np.asarray(Image.fromarray(data.astronaut()).resize((256, 256))))


@pytest.mark.usefixtures("serve_http_port")
def test_serve_replica_killed_mid_run(platform, tmp_path):
    from helpers import write_media

    image = write_media(platform, "freplica/face.png", _small_face_png())
    store = platform.store
    dc = store.create_data_collection("replica", [{"name": "image_1", "is_primary": True}])
    project = store.create_project("replica", dc)
    rows = [
        {"data_unit": store.create_data_unit(dc, {"image_1": {"path": image}}), "status": "pending"}
        for _ in range(80)
    ]
    ids = store.create_tasks_bulk(project, rows)
    release = faces_release(platform, "1.0.0-kill")
    params = {
        "name": "Replica_Kill",
        "project": project,
        "method": "inference",
        "pre_processor": release,
        "batch_size": 4,
    }
    report = tmp_path / "r.jsonl"
    run = dict(serve_poll_interval_s=0.5, num_actors=1, progress_bar=False, inference_call_timeout_s=60)
    thread, box = run_in_background(
        lambda: run_to_task(params, platform=config_for(platform), report=report, **run)
    )
    app = "faces@1.0.0-kill"
    try:
        wait_for_writes(platform, ids, 8, timeout=180)
        killed = kill_replicas(app)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the run did not end within 300 s of the replica's kill"
        _run_after_the_kill(platform, store, ids, params, report, tmp_path, box, run)
        # the re-run above needed a replica: Serve replaced the killed ones with new processes
        wait_until(
            lambda: set(replica_pids(app).values()) - set(killed),
            f"Serve to replace the killed replicas of {app} (pids {killed}) with a live one",
            timeout=120,
        )
    finally:
        from ray import serve

        serve.delete(app)


def _run_after_the_kill(platform, store, ids, params, report, tmp_path, box, run) -> None:
    assert "error" not in box, box.get("error")
    result = box["result"]
    outcomes = read_report(report)
    assert sorted(outcomes) == sorted(
        ids
    ) and result.success_count + result.unchanged_count + result.failed_count == len(ids)
    for tid, o in outcomes.items():
        writes = store.history_counts(task_ids=[tid]).get(tid, 0)
        assert (writes >= 1) if o["status"] == "success" else True
        contents = {json.dumps(h["data"], sort_keys=True) for h in store.history(tid)}
        assert len(contents) <= 1
    failed = [o for o in outcomes.values() if o["status"] == "failed"]
    assert all("pre-processor" in o["error"] for o in failed), failed[:3]
    print(
        f"\n[fault summary] replica: tasks={len(ids)} success={result.success_count} failed={result.failed_count}"
    )
    again = run_to_task(
        params, platform=config_for(platform), resume=report, report=tmp_path / "r2.jsonl", **run
    )
    print(
        f"[fault summary] re-run: tasks={again.total_tasks} success={again.success_count} failed={again.failed_count}"
    )
    assert again.failed_count == 0
    assert all(store.get_task(t)["data"]["objects"] for t in ids)
