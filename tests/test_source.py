"""The task-id source: short page ranges that together list every matching task exactly once.

Runs each read task's function in this process against the real embedded platform (no Ray
needed to check what the reads return; the pipeline tests run them on Ray)."""

from __future__ import annotations

import numpy as np
from helpers import config_for, make_project

from totask_ray.params import ToTaskParams
from totask_ray.pipeline.source import PAGES_PER_READ_TASK, TaskIdSource
from totask_ray.pipeline.spec import RunOptions, RunSpec


def _spec(platform, project: int, page_size: int) -> RunSpec:
    params = ToTaskParams.parse({"name": "Ids", "project": project, "target_specification_name": "a"})
    return RunSpec(params=params, options=RunOptions(page_size=page_size), platform=config_for(platform))


def _read_all(source: TaskIdSource) -> tuple[list[int], list[int], int]:
    tasks = source.get_read_tasks(parallelism=200)
    ids: list[int] = []
    for t in tasks:
        for block in t():
            ids.extend(block.column("task_id").to_pylist())
    return ids, [t.metadata.num_rows for t in tasks], len(tasks)


def test_short_reads_cover_every_task_once(platform):
    project, task_ids = make_project(platform, [{"files": None, "status": "pending"}] * 2_050)
    make_project(platform, [{"files": None}] * 30)  # another project's tasks must not appear
    page = 100
    source = TaskIdSource(_spec(platform, project, page), count=len(task_ids))
    ids, rows, n_reads = _read_all(source)
    pages = -(-len(task_ids) // page)
    assert n_reads == -(-pages // PAGES_PER_READ_TASK)  # short ranges, not one per CPU
    assert sorted(ids) == sorted(task_ids) and len(ids) == len(set(ids))
    assert sum(rows) == len(task_ids)  # Ray Data plans with these row counts


def test_reads_skip_excluded_tasks_and_stop_when_the_listing_shrinks(platform):
    project, task_ids = make_project(platform, [{"files": None}] * 450)
    exclude = np.array(sorted(task_ids[::3]), dtype=np.int64)
    # counted 1,000 tasks but only 450 exist now: the reads past the end find no page and stop
    source = TaskIdSource(_spec(platform, project, 50), count=1_000, exclude=exclude)
    ids, _, n_reads = _read_all(source)
    assert n_reads == -(-20 // PAGES_PER_READ_TASK)  # planned on the count: 20 pages of 50
    assert sorted(ids) == sorted(set(task_ids) - set(exclude.tolist()))
