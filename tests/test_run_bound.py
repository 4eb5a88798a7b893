"""The run names the stage that bound it (issue 28): from the per-task stage times its outcomes carry
(read, convert, model, write), the one its tasks spent most of their time in, at the end of every
run's message and in the result (`bound_by`, `stage_seconds`).

The platform's own fault mode makes one stage slow for real (its answers are delayed before its
handlers run): slow writes must name the write, slow reads the read. Afterwards the platform holds
every task's annotation either way: the slowness cost time, not data.
"""

from __future__ import annotations

import pytest
from helpers import config_for, good_unit, make_project, read_report

from totask_ray import run_to_task
from totask_ray.pipeline.outcomes import STAGE_TIMES, Outcome, Status
from totask_ray.run.progress import StageClock

pytestmark = pytest.mark.usefixtures("ray_cluster")

TASKS = 12
SLOW_S = 0.4  # per request of the slowed kind: far above a loopback round-trip (~ms) even under load
FAST = {"progress_bar": False, "num_actors": 1}


@pytest.fixture(autouse=True)
def _clear(platform):
    yield
    platform.clear_faults()


def _run(platform, prefix: str, tmp_path):
    units = [good_unit(platform, i, prefix) for i in range(TASKS)]
    project, ids = make_project(platform, units)
    job = {"name": f"Bound_{prefix}", "project": project, "target_specification_name": "annotation_data"}
    report = tmp_path / f"{prefix}.jsonl"
    result = run_to_task(job, platform=config_for(platform), report=report, **FAST)
    assert result.success_count == TASKS, result.message
    # what a user checks on the platform: every task holds its annotation file's data
    assert [platform.store.get_task(t)["data"] for t in ids] == [u["expected"] for u in units]
    return result, read_report(report)


@pytest.mark.parametrize(
    ("stage", "path_regex", "method"),
    [("write", "annotate_task_data", "PUT"), ("read", "^/tasks/[0-9]+/$", "GET")],
)
def test_the_slowed_stage_is_named(platform, tmp_path, stage, path_regex, method):
    """Every answer of one kind held SLOW_S: a platform slow to write names `write`, slow to read
    names `read`; each task's report line carries the wait, and the run's totals at least add it up."""
    platform.set_faults(slow_rate=1.0, slow_s=SLOW_S, path_regex=path_regex, methods=[method])
    result, outcomes = _run(platform, f"bound_{stage}", tmp_path)
    assert result.bound_by == stage, result.message
    assert f"; bound by {stage} (" in result.message, result.message
    assert all(o[f"{stage}_ms"] >= SLOW_S * 1000 for o in outcomes.values()), outcomes
    assert result.stage_seconds[stage] >= TASKS * SLOW_S


def test_the_stage_clock_names_the_largest_share():
    clock = StageClock()
    assert clock.bound() is None and clock.describe() == ""
    for i in range(3):
        o = Outcome(i, Status.SUCCESS, read_ms=10.0, convert_ms=5.0, model_ms=60.0, write_ms=25.0)
        clock.add(o)
    assert clock.bound() == "model"
    assert clock.seconds() == {"read": 0.03, "convert": 0.015, "model": 0.18, "write": 0.075}
    assert clock.describe() == (
        "bound by model (60 % of the tasks' time: read 10 %, convert 5 %, model 60 %, write 25 %)"
    )
    assert set(clock.seconds()) == set(STAGE_TIMES)
