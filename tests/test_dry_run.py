"""A dry run over a large project writes nothing at all, to any task.

`tests/test_rerun.py` checks a dry run on 5 tasks; a write that slips through for one task in
fifty (or one batch, one actor) would pass there. Here a few hundred tasks go through a real dry
run on the real embedded platform, and the platform itself is asked afterwards: no annotation
history row for any task of the project, every task row (data, status, assignee, updated_at)
exactly as before, and each task reported as a would-be success holding its file's content.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import config_for, read_report

from totask_ray import run_to_task
from totask_ray.embedded.seeds import seed_files_demo

pytestmark = pytest.mark.usefixtures("ray_cluster")

TASKS = 400  # a write for one task in 50 would hit 8 of them
FILE = {"name": "Dry_Run_Job", "method": "file", "target_specification_name": "annotation_data"}


@pytest.mark.slow
def test_dry_run_over_large_project_writes_nothing(platform, tmp_path):
    store = platform.store
    seeded = seed_files_demo(store, platform.media_dir, tasks=TASKS, seed=11)
    project = seeded["project"]
    first, last = seeded["task_ids"]["first"], seeded["task_ids"]["last"]
    ids = list(range(first, last + 1))
    assert len(ids) == TASKS
    # Some tasks already hold data (overwrite is the default policy): a dry run must not replace it.
    kept = {"objects": [], "note": "reviewed by a person"}
    for tid in ids[::7]:
        store.update_task(tid, data=kept)
    before = {t["id"]: t for t in store.tasks_by_ids(ids)}
    assert store.history_counts(project_id=project) == {}

    report = tmp_path / "dry.jsonl"
    result = run_to_task(
        {**FILE, "project": project},
        platform=config_for(platform),
        report=report,
        dry_run=True,
        progress_bar=False,
    )

    # The platform's own record: not one annotate write anywhere in the project, no task touched.
    assert store.history_counts(project_id=project) == {}, "a dry run wrote annotations"
    after = {t["id"]: t for t in store.tasks_by_ids(ids)}
    changed = sorted(tid for tid in ids if after[tid] != before[tid])
    assert not changed, f"a dry run changed {len(changed)} tasks, e.g. {changed[:5]}"

    # Every task counted and reported as a would-be success with exactly its file's content.
    assert (result.total_tasks, result.success_count, result.failed_count) == (TASKS, TASKS, 0)
    assert result.skipped_count == 0
    outcomes = read_report(report)
    assert sorted(outcomes) == ids
    media = Path(platform.media_dir)
    for tid in ids:
        rec = outcomes[tid]
        assert rec["status"] == "success" and not rec["written"], f"task {tid}: {rec}"
        files = {f["specification_name"]: f for f in store.data_unit_files(before[tid]["data_unit"])}
        on_disk = json.loads((media / files["annotation_data"]["path"]).read_text())
        assert rec["would_write"] == on_disk, f"task {tid} would write something else than its file"
