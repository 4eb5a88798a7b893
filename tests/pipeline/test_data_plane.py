"""The data plane at small sizes: what would grow with a job of millions stays flat.

- a resume's read tasks carry a reference to the done ids, not the ids (pickled size measured);
- an id-range (keyset) listing skips and repeats nothing while tasks leave the filters under it,
  where offset pages skip (shown beside it, so the check can fail);
- a snapshot (offset listing, `on_success` moving the filtered field) spreads over every actor;
- a run leaves the caller's Ray Data context, Ray Data's log levels and the warnings filters as
  they were.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings
from collections import Counter
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from helpers import config_for, good_unit, make_project

from totask_ray import run_to_task
from totask_ray.params import ToTaskParams
from totask_ray.pipeline.run import AnnotatorSpec, PipelineSpec, listing, run_pipeline
from totask_ray.pipeline.source import TaskIdSource
from totask_ray.pipeline.spec import RunOptions, RunSpec
from totask_ray.platform.synapse.client import SynapseClient
from totask_ray.result import RunStatus

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stand-in annotator below

ID_RANGES = pytest.mark.parametrize("id_ranges", [True, False], ids=["id-ranges", "offset-pages"])


def _spec(platform, project: int, page_size: int = 100, filters: dict | None = None, **kw: Any) -> RunSpec:
    params = ToTaskParams.parse(
        {"name": "Ids", "project": project, "target_specification_name": "a", "task_filters": filters or {},
         **kw.pop("params", {})}
    )  # fmt: skip
    options = RunOptions(page_size=page_size, **kw.pop("options", {}))
    return RunSpec(params=params, options=options, platform=config_for(platform, **kw))


def _pipeline(
    spec: RunSpec, total: int, exclude: np.ndarray | None = None, annotator: Any = None
) -> PipelineSpec:
    return PipelineSpec(
        run=spec,
        annotator=annotator or AnnotatorSpec(object, {}),
        total=total,
        exclude=exclude,
        lister=SynapseClient(spec.platform),
    )


def _listed(source: TaskIdSource, after_block: Any = None) -> list[int]:
    """Every id the source's reads return, run here one after another."""
    ids: list[int] = []
    for task in source.get_read_tasks(parallelism=1):
        for block in task():
            got = block.column("task_id").to_pylist()
            ids.extend(got)
            if after_block is not None:
                after_block(got)
    return ids


@ID_RANGES
@pytest.mark.usefixtures("ray_cluster")
def test_resume_read_tasks_carry_a_reference_not_the_done_ids(platform, id_ranges):
    project, ids = make_project(platform, [{"files": None}] * 4_000)
    spec = _spec(platform, project, page_size=100, id_ranges=None if id_ranges else False)
    sizes = {}
    for done in (10, 3_000):
        source = listing(_pipeline(spec, len(ids), exclude=np.array(ids[:done], dtype=np.int64)))
        assert (source.bounds is not None) is id_ranges
        tasks = source.get_read_tasks(parallelism=1)
        sizes[done] = [len(ray.cloudpickle.dumps(t)) for t in tasks]
        assert sorted(_listed(source)) == ids[done:]  # the reads still skip every done task
    assert len(sizes[10]) == len(sizes[3_000]) == 20
    # by value, 3,000 done ids were 24 KB in every read task; by reference the size does not move
    assert max(sizes[3_000]) - max(sizes[10]) < 64, (sizes[10][:3], sizes[3_000][:3])
    assert max(sizes[3_000]) < 8_000


def test_id_ranges_skip_and_repeat_nothing_while_tasks_leave_the_filter(platform):
    project, ids = make_project(platform, [{"files": None, "status": "pending"}] * 3_000)
    other, _ = make_project(platform, [{"files": None}] * 3)

    def written(block: list[int]) -> None:
        """What on_success does to each task written, from another connection (the cache goes
        stale), and tasks created elsewhere meanwhile."""
        platform.store.execute(
            f"UPDATE tasks SET status = 'in_progress' WHERE id IN ({','.join('?' * len(block))})", block
        )
        platform.store.create_tasks_bulk(other, [{"status": "pending"}])

    spec = _spec(platform, project, page_size=100, filters={"status": "pending"})
    source = listing(_pipeline(spec, len(ids)))
    assert source.bounds == (ids[0], ids[-1]) and source.read_count == 15
    got = _listed(source, written)
    assert len(got) == len(set(got)) == len(ids) and sorted(got) == ids

    # the same writes under offset pages skip tasks (each page is counted from a moved listing)
    project, ids = make_project(platform, [{"files": None, "status": "pending"}] * 3_000)
    spec = _spec(platform, project, page_size=100, filters={"status": "pending"}, id_ranges=False)
    source = listing(_pipeline(spec, len(ids)))
    assert source.bounds is None
    assert len(set(_listed(source, written))) < len(ids)


@ray.remote(num_cpus=0)
class _Started:
    """Annotators check in; a batch waits until every one has (so the spread measured is the
    blocks', not which actor happened to start first on a loaded box)."""

    def __init__(self, n: int):
        self.n = n
        self.seen: set[str] = set()
        self.all_in = asyncio.Event()

    async def check_in(self, who: str) -> None:
        self.seen.add(who)
        if len(self.seen) >= self.n:
            self.all_in.set()

    async def wait_all(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.all_in.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"only {len(self.seen)} of {self.n} annotator actors started in {timeout_s} s"
            ) from None


class _MoveAndSay:
    """Stands in for a method's annotator (the pipeline knows no method): moves each task out of
    the run's filter on the platform, as `on_success` does, and says which actor did it."""

    def __init__(self, url: str, headers: dict[str, str], started: Any):
        self.me = ray.get_runtime_context().get_actor_id()
        self.started = started
        ray.get(started.check_in.remote(self.me))
        self.http = httpx.Client(base_url=url, headers=headers, timeout=30)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ray.get(self.started.wait_all.remote(120))
        for tid in batch["task_id"].tolist():
            self.http.patch(f"/tasks/{tid}/", json={"status": "in_progress"}).raise_for_status()
        return {"task_id": batch["task_id"], "actor": np.array([self.me] * len(batch["task_id"]))}


@pytest.mark.slow  # a pipeline with 4 actors: about 20 s here
@pytest.mark.usefixtures("ray_cluster")
def test_a_snapshot_run_spreads_over_every_actor(platform):
    n, actors = 1_000, 4
    project, ids = make_project(platform, [{"files": None, "status": "pending"}] * n)
    spec = _spec(
        platform, project, page_size=500, filters={"status": "pending"}, id_ranges=False,
        params={"batch_size": 25, "on_success": {"status": "in_progress"}},
        options={"num_actors": actors, "actor_cpus": 0.5},
    )  # fmt: skip
    started = _Started.remote(actors)
    probe = AnnotatorSpec(_MoveAndSay, {"url": platform.url, "headers": platform.headers, "started": started})
    share: Counter[str] = Counter()
    done: list[int] = []
    for batch in run_pipeline(_pipeline(spec, n, annotator=probe)):
        share.update(batch["actor"].tolist())
        done.extend(batch["task_id"].tolist())
    assert sorted(done) == ids  # the snapshot listed every task once, though each left the filter
    assert all(platform.store.get_task(t)["status"] == "in_progress" for t in ids)
    even = n / actors
    assert len(share) == actors and min(share.values()) >= even / 2, dict(share)


def _data_context_fields() -> dict[str, Any]:
    from ray.data import DataContext

    dc = DataContext.get_current()
    names = ("enable_progress_bars", "enable_operator_progress_bars", "enable_auto_log_stats",
             "execution_no_progress_timeout_s", "wait_for_min_actors_s", "max_consecutive_actor_init_deaths")  # fmt: skip
    return {"object": id(dc), **{k: getattr(dc, k) for k in names}}


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_leaves_the_callers_ray_data_settings_as_they_were(platform):
    project, ids = make_project(platform, [good_unit(platform, i, "dp") for i in range(6)])
    before = _data_context_fields()
    levels = {n: logging.getLogger(n).level for n in ("ray.data", "ray.data._internal.progress")}
    filters = list(warnings.filters)
    result = run_to_task(
        {"name": "Ctx", "project": project, "target_specification_name": "annotation_data"},
        platform=config_for(platform), num_actors=1, progress_bar=False, no_progress_timeout_s=123,
    )  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED and result.success_count == len(ids)
    assert _data_context_fields() == before
    assert {n: logging.getLogger(n).level for n in levels} == levels
    assert list(warnings.filters) == filters


@pytest.mark.slow  # a file-method run of 300 tasks: about 10 s here
@pytest.mark.usefixtures("ray_cluster")
def test_on_success_moving_the_filtered_status_streams_by_id_ranges_and_writes_each_task_once(
    platform, caplog
):
    """README's example (a status filter, on_success moving the status): on a platform that reads
    id ranges the ids stream (no snapshot first), and still no task is skipped or written twice."""
    units = [good_unit(platform, i, "dpm") for i in range(300)]
    project, ids = make_project(platform, units)
    caplog.set_level(logging.INFO, logger="totask_ray")
    result = run_to_task(
        {"name": "Move", "project": project, "target_specification_name": "annotation_data",
         "task_filters": {"status": "pending"}, "on_success": {"status": "in_progress"}},
        platform=config_for(platform), num_actors=2, page_size=20, progress_bar=False,
    )  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED
    assert (result.success_count, result.workflow_applied_count) == (len(ids), len(ids))
    assert "before writing" not in caplog.text  # streamed: no snapshot of the ids first
    writes = platform.store.history_counts(project_id=project)
    for tid, unit in zip(ids, units, strict=True):
        task = platform.store.get_task(tid)
        assert (task["status"], task["data"]) == ("in_progress", unit["expected"])
        assert writes.get(tid) == 1, f"task {tid} was written {writes.get(tid, 0)} times"
