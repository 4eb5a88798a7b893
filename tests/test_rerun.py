"""Re-runs: `resume` runs only what an earlier report did not finish, `existing_data: skip` leaves
annotated tasks alone (overwrite is the default, as in the Synapse action), `dry_run` writes nothing
and reports what it would have written."""

from __future__ import annotations

import json

import pytest
from helpers import config_for, good_unit, make_project, read_report, write_media

from totask_ray import run_to_task

pytestmark = pytest.mark.usefixtures("ray_cluster")
FILE = {"name": "Rerun_Job", "target_specification_name": "annotation_data"}
RUN = {"num_actors": 1, "progress_bar": False}


def test_dry_run_writes_nothing_and_reports_each_payload(platform, tmp_path):
    units = [good_unit(platform, i, "dry") for i in range(5)]
    project, ids = make_project(platform, units)
    report = tmp_path / "dry.jsonl"
    result = run_to_task(
        {**FILE, "project": project}, platform=config_for(platform), report=report, dry_run=True, **RUN
    )
    assert result.success_count == 5
    assert platform.store.history_counts(task_ids=ids) == {}
    outcomes = read_report(report)
    for tid, unit in zip(ids, units, strict=True):
        assert outcomes[tid]["would_write"] == unit["expected"] and not outcomes[tid]["written"]


def test_existing_data_skip_and_overwrite(platform):
    units = [good_unit(platform, i, "policy") for i in range(4)]
    old = {"objects": [], "note": "reviewed by a person"}
    units[0]["data"] = old
    units[1]["data"] = old
    project, ids = make_project(platform, units)
    skip = run_to_task(
        {**FILE, "project": project, "existing_data": "skip"}, platform=config_for(platform), **RUN
    )
    assert (skip.success_count, skip.skipped_count, skip.failed_count) == (2, 2, 0)
    assert [platform.store.get_task(t)["data"] for t in ids[:2]] == [old, old]
    over = run_to_task({**FILE, "project": project}, platform=config_for(platform), **RUN)
    # the two tasks the skip run wrote already hold this data: compared, not written again
    assert (over.success_count, over.unchanged_count, over.failed_count) == (2, 2, 0)
    assert [platform.store.get_task(t)["data"] for t in ids] == [u["expected"] for u in units]
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}


def test_resume_runs_only_what_is_left(platform, tmp_path):
    units = [good_unit(platform, i, "resume") for i in range(6)]
    broken = write_media(platform, "resume/broken.json", "{not json")
    for u in units[3:]:
        u["files"]["annotation_data"] = {"path": broken}
    project, ids = make_project(platform, units)
    first = tmp_path / "first.jsonl"
    r1 = run_to_task({**FILE, "project": project}, platform=config_for(platform), report=first, **RUN)
    assert (r1.success_count, r1.failed_count) == (3, 3)
    write_media(platform, "resume/broken.json", json.dumps({"objects": []}))  # the user fixes the file
    second = tmp_path / "second.jsonl"
    r2 = run_to_task(
        {**FILE, "project": project}, platform=config_for(platform), report=second, resume=first, **RUN
    )
    chained = read_report(second)  # the earlier report's successes are carried into the new one
    assert sorted(chained) == ids
    assert [chained[t]["status"] for t in ids] == ["success"] * 3 + [
        "empty"
    ] * 3  # the fixed files hold no object
    assert (r2.total_tasks, r2.success_count, r2.failed_count) == (3, 3, 0)
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}  # nothing written twice
