"""The preview's whole-job estimate against the run it projects.

On the file and faces demos at two sizes each, `preview` projects the run's wall time (start-up +
tasks / the smallest stage capacity, `preview/estimate.py`); then the job runs for real on the same
cluster and platform, with `projected_s` so that it reports achieved against projected. Both figures
are printed per case. The run here is in the preview's process, on its Ray, as in a notebook: the
estimate is the warm one (`fresh_process=False`).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from helpers import config_for

from totask_ray import run_to_task
from totask_ray.embedded.seeds import seed_faces_demo, seed_files_demo
from totask_ray.preview import preview

# The issue's +-30 % is checked by `python -m bench estimate` (medians of 3, BENCHMARKS): on this
# shared 2-core box one run can take twice another's time under a neighbour's load, which the
# preview only sees while it runs. What the test holds is a sanity bound that load cannot break but a
# wrong model does (a missing start-up, a capacity off by more than a factor of 3); the printed
# figures say how close each case came.
WITHIN_FACTOR = 3.0
SAMPLE = 12
FAST = {"serve_poll_interval_s": 0.5, "serve_ready_timeout_s": 120, "progress_bar": False}
CASES = [("file", 60), ("file", 240), ("faces", 16), ("faces", 48)]


@pytest.fixture(scope="module")
def warm(ray_cluster, platform) -> None:
    """One small preview first. The first Ray Data work on a fresh Ray spawns its worker processes,
    seconds that a dry run counts as start-up and the run after it does not pay (measured: projected
    11.1 s, run 4.4 s); a notebook's run after its preview is in the second case, as are these."""
    job, _ = _job(platform, "file", 4)
    preview(job, platform=config_for(platform), sample=2, **FAST)


def _job(platform: Any, demo: str, tasks: int) -> tuple[dict[str, Any], int]:
    if demo == "file":
        s = seed_files_demo(platform.store, platform.media_dir, tasks=tasks, seed=5)
        job = {"name": f"Est_file_{tasks}", "method": "file", "target_specification_name": "annotation_data"}
    else:
        s = seed_faces_demo(platform.store, platform.media_dir, tasks=tasks, seed=5)
        job = {
            "name": f"Est_faces_{tasks}", "method": "inference", "pre_processor": s["pre_processor"],
            "pre_processor_params": s["pre_processor_params"], "batch_size": 8,
        }  # fmt: skip
    return {**job, "project": s["project"]}, s["project"]


@pytest.mark.slow
@pytest.mark.parametrize(("demo", "tasks"), CASES, ids=[f"{d}-{n}" for d, n in CASES])
def test_projected_wall_time_is_near_the_run(ray_cluster, platform, warm, demo, tasks):
    job, project = _job(platform, demo, tasks)
    config = config_for(platform)
    page = preview(job, platform=config, sample=SAMPLE, **FAST)
    est = page.estimate
    assert est is not None and est.tasks == tasks and est.stages, page.timings
    assert platform.store.history_counts(project_id=project) == {}, "the preview (its probe) wrote"
    assert 'id="estimate"' in page.html and est.summary() in page.html
    assert f"bound by {est.bound.name}" in est.summary()

    t0 = time.monotonic()
    result = run_to_task(job, platform=config, projected_s=est.projected_s, **FAST)
    wall = time.monotonic() - t0
    off = (wall - est.projected_s) / wall
    print(
        f"\n{demo} {tasks} tasks: projected {est.projected_s:.1f} s (start-up {est.start_s:.1f} s + "
        f"{est.work_s:.1f} s bound by {est.bound.name}; not counted: Ray {est.ray_start_s:.1f} s, prepare "
        f"{est.prepare_s:.1f} s), measured {wall:.1f} s ({off:+.0%}); "
        f"stages: {', '.join(f'{s.name} {s.per_s:.0f}/s' for s in est.stages)}"
    )
    # what a user checks afterwards: every task written, and the run's own line against the projection
    assert result.success_count == tasks, result.message
    assert sum(platform.store.history_counts(project_id=project).values()) >= tasks
    assert f"against {est.projected_s:.1f} s projected" in result.message, result.message
    ratio = wall / est.projected_s
    assert 1 / WITHIN_FACTOR <= ratio <= WITHIN_FACTOR, (
        f"projected {est.projected_s:.1f} s, measured {wall:.1f} s ({off:+.0%})"
    )
