"""Workflow actions after writing (Encord: "use model predictions as an annotator", then submit).

The embedded platform enforces one-stage-at-a-time transitions; a refused action fails the task's
workflow step without undoing its annotation, and both outcomes are counted.
"""

from __future__ import annotations

import httpx
import pytest
from helpers import config_for, good_unit, make_project

from totask_ray import run_to_task
from totask_ray.result import RunStatus

FILE = {"name": "Workflow_Job", "target_specification_name": "annotation_data"}


def _patch(platform, tid, body):
    return httpx.patch(f"{platform.url}/tasks/{tid}/", json=body, headers=platform.headers)


def _submit(platform, tid):
    return httpx.post(f"{platform.url}/tasks/{tid}/submit/", headers=platform.headers)


def test_platform_enforces_stage_order(platform):
    _, (a, b, c) = make_project(platform, [good_unit(platform, i, "wf0") for i in range(3)])
    assert _patch(platform, a, {"status": "in_progress"}).json()["status"] == "in_progress"  # same stage
    skipped = _patch(platform, a, {"status": "completed"})  # annotation → complete skips review
    assert skipped.status_code == 400
    assert "one stage at a time; move it to 'in_review' first" in skipped.json()["status"][0]
    assert _submit(platform, a).json()["status"] == "in_review"
    assert (
        _patch(platform, a, {"status": "in_progress"}).json()["status"] == "in_progress"
    )  # a rejection goes back one
    assert _submit(platform, b).json()["status"] == "in_review"
    assert _submit(platform, b).json()["status"] == "completed"
    done = _submit(platform, b)
    assert done.status_code == 400 and "already complete" in done.json()["status"][0]
    assert _patch(platform, c, {"status": "archived"}).status_code == 400
    assert "does not exist" in _patch(platform, c, {"assignee": 987654}).json()["assignee"][0]
    assert platform.store.get_task(c)["status"] == "pending"


@pytest.mark.usefixtures("ray_cluster")
def test_on_success_applied_refused_and_counted(platform):
    units = [good_unit(platform, i, "wf1") for i in range(6)]
    for u, status in zip(units, ["pending"] * 4 + ["in_review"] * 2, strict=True):
        u["status"] = status
    project, ids = make_project(platform, units)
    result = run_to_task(
        {**FILE, "project": project, "on_success": {"status": "completed"}},
        platform=config_for(platform), num_actors=1, progress_bar=False,
    )  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED
    assert (result.success_count, result.failed_count) == (6, 0)  # the annotation counts as written
    assert (result.workflow_applied_count, result.workflow_failed_count) == (2, 4)
    assert "on_success applied to 2, refused for 4" in result.message
    for tid, unit in zip(ids, units, strict=True):
        task = platform.store.get_task(tid)
        assert task["data"] == unit["expected"]  # never undone by a refused workflow step
        assert task["status"] == ("completed" if unit["status"] == "in_review" else "pending")


@pytest.mark.usefixtures("ray_cluster")
def test_submit_and_assign_after_writing(platform, tmp_path):
    user = platform.store.create_user("reviewer_wf")
    project, ids = make_project(platform, [good_unit(platform, i, "wf2") for i in range(4)])
    job = platform.store.create_job("to_task")
    result = run_to_task(
        {**FILE, "project": project, "on_success": {"submit": True, "assignee": user}},
        platform=config_for(platform), num_actors=1, progress_bar=False, job_id=job,
    )  # fmt: skip
    assert result.workflow_applied_count == 4 and result.workflow_failed_count == 0
    for tid in ids:
        task = platform.store.get_task(tid)
        assert (task["status"], task["assignee"]) == ("in_review", user)
    record = platform.store.get_job(job)
    assert record["metrics_record"]["record"]["steps"]["workflow_action"] == {"success": 4, "failed": 0}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_on_success_that_moves_tasks_out_of_the_filter_skips_none(platform):
    # Offset pages read while tasks leave the `status: pending` filter would skip some: the run
    # lists the ids first when on_success changes a filtered field.
    project, ids = make_project(platform, [good_unit(platform, i, "wf3") for i in range(120)])
    result = run_to_task(
        {**FILE, "project": project, "task_filters": {"status": "pending"}, "on_success": {"submit": True}},
        platform=config_for(platform), num_actors=2, progress_bar=False, page_size=10,
    )  # fmt: skip
    assert (result.total_tasks, result.success_count, result.workflow_applied_count) == (120, 120, 120)
    assert {platform.store.get_task(t)["status"] for t in ids} == {"in_review"}
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}


@pytest.mark.slow
def test_rerunning_a_finished_job_writes_nothing_and_applies_nothing_twice(platform):
    """A hard-killed run leaves written tasks that no report holds: the re-run compares before it
    writes (`unchanged`) and applies on_success only where the task is not in its target state, so
    a second submit (which would move the task on another stage) never happens."""
    units = [good_unit(platform, i, "wfrerun") for i in range(6)]
    project, ids = make_project(platform, units)
    user = platform.store.create_user("rerun-reviewer")
    job = {**FILE, "project": project, "on_success": {"submit": True, "assignee": user}}
    first = run_to_task(job, platform=config_for(platform), progress_bar=False)
    assert (first.success_count, first.workflow_applied_count) == (6, 6)
    assert {platform.store.get_task(t)["status"] for t in ids} == {"in_review"}
    again = run_to_task(job, platform=config_for(platform), progress_bar=False)
    assert (again.success_count, again.unchanged_count, again.workflow_applied_count) == (0, 6, 0)
    assert {platform.store.get_task(t)["status"] for t in ids} == {"in_review"}  # not submitted again
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}


def test_a_rerun_submits_a_task_that_was_written_but_never_submitted(platform):
    """The other half of a hard kill: written, killed before the submit. The task still sits where
    the job's status filter found it, so the re-run submits it (and only it), writing nothing."""
    units = [good_unit(platform, i, "wfhalf") for i in range(4)]
    project, ids = make_project(platform, units)
    platform.store.update_task(ids[0], data=units[0]["expected"])  # the write that was reported nowhere
    job = {**FILE, "project": project, "task_filters": {"status__in": ["pending", "in_progress"]},
           "on_success": {"submit": True}}  # fmt: skip
    result = run_to_task(job, platform=config_for(platform), progress_bar=False)
    assert (result.success_count, result.unchanged_count, result.workflow_applied_count) == (3, 1, 4)
    assert {platform.store.get_task(t)["status"] for t in ids} == {"in_review"}
    assert platform.store.history_counts(task_ids=ids).get(ids[0]) is None  # compared, not rewritten
