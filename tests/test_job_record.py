"""The job record and logs of a run, read back from the embedded platform over HTTP.

What a Synapse job page shows is drawn from what the SDK's ToTask action writes (its `JobLogger`,
`synapse_sdk/plugins/actions/to_task/`): these tests pin that a run on Ray writes the same shapes,
with the right numbers, and that the logs never get in the way of the run.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from helpers import config_for, good_unit, make_project, wait_until, write_media

from totask_ray import ToTaskError, run_to_task
from totask_ray.platform.synapse.client import SynapseClient
from totask_ray.result import Metrics, RunStatus
from totask_ray.run.jobs import STEP_PROPORTIONS, JobSink, LogBatcher, TaskEvent

FILE_PARAMS = {"name": "Job_Record", "method": "file", "target_specification_name": "annotation_data"}
STEPS = ["initialize", "prepare", "fetch_tasks", "annotate_task_data", "finalize"]
# `AnnotateTaskEvent.to_dict()` in synapse_sdk/plugins/actions/to_task/action.py
SDK_EVENT_KEYS = {"task_info", "status", "method", "index", "total", "created", "error"}
LOG_ENTRY_KEYS = {"id", "event", "data", "datetime", "job", "step", "level"}


def _get(platform: Any, path: str, **params: Any) -> Any:
    r = httpx.get(f"{platform.url}{path}", params=params, headers=platform.headers, timeout=30)
    r.raise_for_status()
    return r.json()


def job_record(platform: Any, job: int) -> dict[str, Any]:
    return _get(platform, f"/jobs/{job}/")


def job_logs(platform: Any, job: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    page = _get(platform, "/logs/", job=job, page_size=1000)
    out += page["results"]
    while page["next"]:
        r = httpx.get(page["next"], headers=platform.headers, timeout=30)
        r.raise_for_status()
        page = r.json()
        out += page["results"]
    return out


def done_steps(method: str, through: str) -> dict[str, dict[str, Any]]:
    """The SDK's step records with every step up to `through` finished, the rest not started."""
    out = {}
    for order, (name, proportion) in enumerate(STEP_PROPORTIONS[method].items()):  # type: ignore[index]
        out[name] = {"proportion": proportion, "order": order}
        if order <= STEPS.index(through):
            out[name].update(percent=100.0, time_remaining=0.0)
    return out


def assert_iso_utc(value: str) -> None:
    assert datetime.fromisoformat(value).utcoffset() == timedelta(0), value


def _units(platform: Any, prefix: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    good = [good_unit(platform, i, prefix) for i in range(5)]
    unchanged = good_unit(platform, 99, prefix)
    unchanged["data"] = unchanged["expected"]  # the platform already holds what the file says
    img = f"{prefix}/img.png"
    bad = {
        "missing target file": {"files": {"image_1": {"path": img}}},
        "invalid json": {"files": {"image_1": {"path": img},
                                   "annotation_data": {"path": write_media(platform, f"{prefix}/bad.json", "{x")}}},
        "no data unit": {"files": None},
    }  # fmt: skip
    return [*good, unchanged], bad


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_file_run_writes_the_sdk_job_record_and_one_event_per_task(platform):
    ok_units, bad = _units(platform, "jobrec")
    project, ids = make_project(platform, [*ok_units, *bad.values()])
    good_ids, unchanged_id, bad_ids = ids[:5], ids[5], ids[6:]
    job = platform.store.create_job("to_task", {})

    result = run_to_task(
        {**FILE_PARAMS, "project": project}, platform=config_for(platform), job_id=job, num_actors=1,
        progress_bar=False,
    )  # fmt: skip

    assert result.status is RunStatus.SUCCEEDED
    assert (result.success_count, result.unchanged_count, result.failed_count) == (5, 1, 3)
    record = job_record(platform, job)
    assert record["status"] == "SUCCEEDED"
    want_result = result.model_dump(mode="json")
    assert record["result"] == want_result
    assert {f["task_id"] for f in record["result"]["failures"]} == set(bad_ids)

    assert record["metrics_record"] == {
        "record": {"steps": {"annotate_task_data": {"success": 6, "failed": 3, "stand_by": 0}}}
    }
    progress = record["progress_record"]
    assert progress["record"] == {"steps": done_steps("file", "finalize")}
    elapsed = progress["current_progress"].pop("time_elapsed")
    assert isinstance(elapsed, int) and 0 <= elapsed <= result.elapsed_s + 1
    assert progress["current_progress"] == {
        "overall": 100.0, "step": "finalize", "percent": 100.0, "time_remaining": 0.0,
    }  # fmt: skip

    entries = job_logs(platform, job)
    assert [e["event"] for e in entries] == ["annotate_task_data"] * len(ids)
    by_task = {e["data"]["task_info"]["task_id"]: e for e in entries}
    assert sorted(by_task) == sorted(ids), "exactly one event per task"
    assert sorted(e["data"]["index"] for e in entries) == list(range(1, len(ids) + 1))
    errors = {f.task_id: f.error for f in result.failures}
    for e in entries:
        assert set(e) == LOG_ENTRY_KEYS
        assert (e["job"], e["step"], e["level"]) == (job, "annotate_task_data", "info")
        assert_iso_utc(e["datetime"])
        d = e["data"]
        tid = d["task_info"]["task_id"]
        assert set(d) == SDK_EVENT_KEYS | ({"note"} if tid == unchanged_id else set())
        assert (d["method"], d["total"]) == ("file", len(ids))
        assert_iso_utc(d["created"])
        if tid in bad_ids:
            assert (d["status"], d["error"]) == ("failed", errors[tid])
        else:
            assert (d["status"], d["error"]) == ("success", None)
    assert by_task[unchanged_id]["data"]["note"].startswith("unchanged:")
    assert "no data unit" in by_task[bad_ids[2]]["data"]["error"]

    # A re-run that skips what holds data: those are the SDK's "success", with a note saying why.
    rerun = platform.store.create_job("to_task", {})
    again = run_to_task(
        {**FILE_PARAMS, "project": project, "existing_data": "skip"}, platform=config_for(platform),
        job_id=rerun, num_actors=1, progress_bar=False,
    )  # fmt: skip
    assert (again.skipped_count, again.failed_count) == (6, 3)
    assert job_record(platform, rerun)["metrics_record"]["record"]["steps"]["annotate_task_data"] == {
        "success": 6, "failed": 3, "stand_by": 0,
    }  # fmt: skip
    events = {e["data"]["task_info"]["task_id"]: e["data"] for e in job_logs(platform, rerun)}
    assert sorted(events) == sorted(ids)
    for tid in [*good_ids, unchanged_id]:
        assert events[tid]["status"] == "success" and events[tid]["error"] is None
        assert events[tid]["note"] == "skipped: task already holds annotation data"
    assert all(events[tid]["status"] == "failed" for tid in bad_ids)


def test_a_failed_step_is_the_sdks_failed_record(platform):
    project, _ = make_project(platform, [good_unit(platform, 0, "jobfail")])
    job = platform.store.create_job("to_task", {})
    with pytest.raises(ToTaskError):
        run_to_task(
            {**FILE_PARAMS, "project": project, "target_specification_name": "nope"},
            platform=config_for(platform), job_id=job, progress_bar=False,
        )  # fmt: skip
    record = job_record(platform, job)
    assert record["status"] == "FAILED"
    assert set(record["result"]) == {"error"}
    assert record["result"]["error"].startswith("Step 'prepare' failed: ")
    steps = done_steps("file", "initialize")
    steps["prepare"].update(percent=0.0, time_remaining=None)
    progress = record["progress_record"]
    assert progress["record"] == {"steps": steps}
    progress["current_progress"].pop("time_elapsed")
    assert progress["current_progress"] == {
        "overall": 10.0,
        "step": "prepare",
        "percent": 0.0,
        "time_remaining": None,
    }
    assert record["metrics_record"] is None and job_logs(platform, job) == []


def test_progress_mid_run_and_the_inference_clamp(platform):
    """The record while annotating, as the SDK's JobLogger has it; inference's 105 % reads 100."""
    job = platform.store.create_job("to_task", {})
    with SynapseClient(config_for(platform)) as client:
        sink = JobSink(client, job, "file")
        sink.progress(3, 10, Metrics(total=10, success=2, failed=1, stand_by=7), elapsed_s=1.5)
        record = job_record(platform, job)
        steps = done_steps("file", "fetch_tasks")
        steps["annotate_task_data"].update(percent=30.0, time_remaining=3.5)
        assert record["progress_record"] == {
            "record": {"steps": steps},
            "current_progress": {
                "overall": 46.0, "step": "annotate_task_data", "percent": 30.0, "time_remaining": 3.5, "order": 3,
            },
        }  # fmt: skip
        assert record["metrics_record"] == {
            "record": {"steps": {"annotate_task_data": {"success": 2, "failed": 1, "stand_by": 7}}}
        }

        inference = JobSink(client, job, "inference")
        inference.progress(4, 4, Metrics(total=4, success=4), elapsed_s=2.0)
        current = job_record(platform, job)["progress_record"]["current_progress"]
        assert current["overall"] == 100.0  # 10 + 20 + 10 + 60 done of the SDK's 105
        assert [s["proportion"] for s in job_record(platform, job)["progress_record"]["record"]["steps"].values()] == [
            10, 20, 10, 60, 5,
        ]  # fmt: skip


class Recording:
    """The real client, with the time and size of each `post_logs` noted on the way through."""

    def __init__(self, client: SynapseClient):
        self.client = client
        self.posts: list[tuple[float, int]] = []

    def post_logs(self, events: list[dict[str, Any]]) -> Any:
        out = self.client.post_logs(events)
        self.posts.append((time.monotonic(), len(events)))
        return out

    def update_job(self, job_id: int, changes: dict[str, Any]) -> Any:
        return self.client.update_job(job_id, changes)


def _event(i: int, n: int) -> tuple[int, str, int, int]:
    return (1000 + i, "success", i, n)


@pytest.mark.slow
def test_logs_go_in_batches_of_200_or_after_2_s(platform):
    job = platform.store.create_job("to_task", {})
    platform.set_faults(path_regex="^/logs/$", methods=["POST"])  # no faults: it counts the POSTs
    try:
        with SynapseClient(config_for(platform)) as real:
            client = Recording(real)
            sink = JobSink(client, job, "file")  # type: ignore[arg-type]
            t0 = time.monotonic()
            for i in range(1, 451):
                sink.task_event(*_event(i, 454))
            wait_until(lambda: len(client.posts) >= 3, "three log POSTs (200, 200 and the last 50)", 10, 0.02)
            (_, n1), (t2, n2), (t3, n3) = client.posts
            assert (n1, n2, n3) == (200, 200, 50)
            assert t2 - t0 < 1.5, "a full batch goes at once"
            assert 1.9 <= t3 - t0 < 6.0, "the rest goes once its oldest has waited 2 s"

            t4 = time.monotonic()
            sink.task_event(*_event(451, 454))
            wait_until(lambda: len(client.posts) >= 4, "the lone 451st event's POST", 10, 0.02)
            assert len(client.posts) == 4 and client.posts[3][1] == 1
            assert client.posts[3][0] - t4 >= 1.9

            for i in range(452, 455):
                sink.task_event(*_event(i, 454))
            t5 = time.monotonic()
            sink.close_logs()  # the end of a run sends what is left, without waiting for the 2 s
            assert client.posts[4][1] == 3 and client.posts[4][0] - t5 < 1.0
            assert (sink.logs.sent, sink.logs.dropped) == (454, 0)
            sink.task_event(*_event(455, 454))  # after the close: not sent
            assert len(client.posts) == 5
    finally:
        stats = platform.clear_faults()["stats"]
    assert stats["matched"] == 5 and stats["errors"] == 0
    stored = job_logs(platform, job)
    assert [e["data"]["index"] for e in stored] == list(range(1, 455))
    assert {e["data"]["task_info"]["task_id"] for e in stored} == set(range(1001, 1455))


def test_a_stalled_platform_cannot_grow_the_queue_or_stall_the_run():
    release = threading.Event()
    sent: list[int] = []

    def send(batch: list[TaskEvent]) -> None:
        release.wait(10)
        sent.append(len(batch))

    batcher = LogBatcher(send, batch_size=5, interval_s=0.05, max_queued=20, wait_s=0.3)
    event = TaskEvent(1, "success", 1, 1, "", None, None, "")
    t0 = time.monotonic()
    for _ in range(10_000):
        batcher.add(event)
        assert len(batcher._queue) <= 20
    assert time.monotonic() - t0 < 2.0, "the producer waited once for room, then dropped"
    assert batcher.dropped >= 10_000 - 20 - 5
    release.set()
    batcher.close()
    assert sum(sent) + batcher.dropped == 10_000


@pytest.mark.usefixtures("ray_cluster")
def test_a_platform_refusing_logs_does_not_fail_the_run(platform, caplog):
    ok_units, bad = _units(platform, "jobnolog")
    project, ids = make_project(platform, [*ok_units, *bad.values()])
    job = platform.store.create_job("to_task", {})
    platform.set_faults(error_rate=1.0, statuses=[500], path_regex="^/logs/$", methods=["POST"])
    try:
        with caplog.at_level(logging.INFO, logger="totask_ray"):
            result = run_to_task(
                {**FILE_PARAMS, "project": project}, platform=config_for(platform), job_id=job,
                num_actors=1, progress_bar=False,
            )  # fmt: skip
    finally:
        stats = platform.clear_faults()["stats"]
    assert stats["errors"] >= 1
    assert result.status is RunStatus.SUCCEEDED
    assert (result.success_count + result.unchanged_count, result.failed_count) == (6, 3)
    record = job_record(platform, job)
    assert record["status"] == "SUCCEEDED"
    assert record["progress_record"]["current_progress"]["overall"] == 100.0
    assert record["metrics_record"]["record"]["steps"]["annotate_task_data"]["success"] == 6
    assert job_logs(platform, job) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "log event" in r.getMessage()]
    assert len(warnings) == 1, "a refusal is warned about once"
    assert "HTTP 500" in warnings[0].getMessage()
    assert any(
        f"{len(ids)} of {len(ids)} log event(s) did not reach job {job}" in r.getMessage()
        for r in caplog.records
    )
