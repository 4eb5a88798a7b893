"""A stop loses nothing: SIGINT, SIGTERM, `ray job stop` and SIGKILL of a running `totask-ray run`,
each followed by `--resume`, checked on the platform afterwards.

After every case: each selected task holds its data, no task was written twice (the resume compares
before it writes, so even a hard kill's unreported writes are not repeated), and the final report
equals the platform's state. Graceful stops also keep the report ahead of the platform: every task
the platform holds a write of is a success in the report written at the stop, and the job record
says STOPPED with the same counts. Each case prints one row of the table the closing note quotes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, cli_env, good_unit, job_submit, make_project, ray_head, read_report

from totask_ray.platform.synapse import SynapseClient, SynapseConfig

pytestmark = pytest.mark.slow

TASKS = 800
STOP_AT = 0.25  # the signal comes once this share of the tasks has been written
HOLD_S = 1.5  # from then on each write waits this long, so the stop lands before the run can end


def _hold_writes(platform) -> None:
    """Slow every write from now on (the platform's own fault injection: a fake slowness, because a
    real platform cannot be told to slow down on cue). Without it the signal races the run's last
    writes: on a fast machine the run ended before `ray job stop` had even started."""
    platform.set_faults(slow_rate=1.0, slow_s=HOLD_S, path_regex="annotate_task_data", methods=["PUT"])


@pytest.fixture(scope="module")
def gcs_address(ray_cluster):
    return ray_cluster.get_runtime_context().gcs_address


def _project(platform, tmp_path: Path, name: str) -> tuple[int, list[int], list[dict], Path, int]:
    platform.clear_faults()  # a case that failed before its resume may have left the writes held
    units = [good_unit(platform, i, name) for i in range(TASKS)]
    project, ids = make_project(platform, units)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {"name": f"Stop_{name}", "project": project, "target_specification_name": "annotation_data"}
        )
    )
    config = SynapseConfig(host=platform.url, access_token=platform.token)
    with SynapseClient(config) as client:
        job_id = client.create_job({"action": "to_task", "params": {"project": project}}).id
    return project, ids, units, job, job_id


def _written(platform, project: int) -> dict[int, int]:
    return platform.store.history_counts(project_id=project)


def _wait_for_writes(platform, project: int, proc: subprocess.Popen | None, at_least: int) -> None:
    deadline = time.monotonic() + 240
    while len(_written(platform, project)) < at_least:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the run ended before it could be stopped (exit {proc.returncode}): {out[-2000:]}")
        assert time.monotonic() < deadline, "the run wrote too little to be stopped mid-way"
        time.sleep(0.05)


def _successes(report: Path) -> set[int]:
    return {t for t, r in read_report(report).items() if r["status"] in ("success", "unchanged", "skipped")}


def _resume_and_check(platform, project, ids, units, job: Path, first: Path, tmp_path: Path, env, address):
    """Resume from the stopped run's report; then every check the issue names, on the platform."""
    platform.clear_faults()
    before = _written(platform, project)
    final = tmp_path / "final.jsonl"
    proc = subprocess.run(
        [str(BIN / "totask-ray"), "run", str(job), "--report", str(final), "--resume", str(first),
         "--address", address],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    after = _written(platform, project)
    for tid, unit in zip(ids, units, strict=True):
        assert platform.store.get_task(tid)["data"] == unit["expected"], f"task {tid} lacks its data"
    rewritten = sorted(t for t, n in after.items() if n > 1)
    assert not rewritten, f"written twice: {rewritten[:10]}"
    # the final report equals the platform: every task, each once, each holding what was written
    assert _successes(final) == set(ids) == set(after)
    return len(after) - len(before), len(rewritten)


def _row(case: str, written: int, in_report: int, rewritten: int, exit_s: float, code: int) -> None:
    print(
        f"\nSTOP-TABLE | {case} | tasks {TASKS} | written before the stop {written} | in the report {in_report} "
        f"| re-written by the resume {rewritten} | signal to exit {exit_s:.2f} s | exit {code} |"
    )


def _cli_case(platform, tmp_path, gcs_address, sig: signal.Signals, name: str):
    project, ids, units, job, job_id = _project(platform, tmp_path, name)
    env = cli_env(platform)
    first = tmp_path / "first.jsonl"
    proc = subprocess.Popen(
        [str(BIN / "totask-ray"), "run", str(job), "--report", str(first), "--address", gcs_address,
         "--job-id", str(job_id)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for_writes(platform, project, proc, int(TASKS * STOP_AT))
        _hold_writes(platform)
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    return project, ids, units, job, job_id, env, first, proc.returncode, exit_s, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_gracefully_and_the_resume_writes_each_task_once(
    slow_platform, tmp_path, gcs_address, sig
):
    platform = slow_platform
    project, ids, units, job, job_id, env, first, code, exit_s, out = _cli_case(
        platform, tmp_path, gcs_address, sig, sig.name.lower()
    )
    assert code == 130, out[-3000:]
    assert f"Stopped by {sig.name}" in out
    assert platform.token not in out
    written = _written(platform, project)
    reported = _successes(first)
    assert len(written) < TASKS, "the run finished before the stop: nothing was tested"
    # the report never holds fewer successes than the platform holds writes
    assert set(written) <= reported, f"{len(set(written) - reported)} writes are in no report"
    assert reported <= set(written)
    record = SynapseClient(SynapseConfig(host=platform.url, access_token=platform.token)).get_job(job_id)
    assert record.status == "STOPPED"
    assert record.result["success_count"] == len(reported)
    added, rewritten = _resume_and_check(
        platform, project, ids, units, job, first, tmp_path, env, gcs_address
    )
    assert added == TASKS - len(written)
    _row(f"{sig.name} on totask-ray run", len(written), len(reported), rewritten, exit_s, code)


def test_sigkill_of_the_driver_then_resume_writes_nothing_twice(slow_platform, tmp_path, gcs_address):
    """A hard kill leaves writes that no report holds; the resume finds them already there
    (`unchanged`) instead of writing them again."""
    platform = slow_platform
    project, ids, units, job, _job_id, env, first, code, exit_s, _out = _cli_case(
        platform, tmp_path, gcs_address, signal.SIGKILL, "sigkill"
    )
    assert code == -signal.SIGKILL
    time.sleep(3)  # the killed driver's actors may finish a write or two while Ray cleans them up
    written = _written(platform, project)
    reported = _successes(first) if first.exists() else set()
    assert len(written) < TASKS
    _added, rewritten = _resume_and_check(
        platform, project, ids, units, job, first, tmp_path, env, gcs_address
    )
    final = read_report(tmp_path / "final.jsonl")
    unreported = set(written) - reported
    assert {t for t in unreported if final[t]["status"] == "unchanged"} == unreported
    _row("SIGKILL of the driver", len(written), len(reported), rewritten, exit_s, code)


def test_the_python_api_raises_run_stopped_with_the_counts(slow_platform, tmp_path):
    """A notebook's interrupt is a SIGINT to the kernel's main thread: `run_to_task` finalizes and
    raises `RunStopped` (a KeyboardInterrupt) whose result counts every write."""
    platform = slow_platform
    project, _ids, _units, _job, _job_id = _project(platform, tmp_path, "api")
    report = tmp_path / "api.jsonl"
    script = f"""
import json, sys
from totask_ray import RunStopped, run_to_task
from totask_ray.platform.synapse import SynapseConfig
try:
    run_to_task({{"name": "Api_Stop", "project": {project}, "target_specification_name": "annotation_data"}},
                platform=SynapseConfig(host={platform.url!r}, access_token={platform.token!r}),
                report={str(report)!r}, num_actors=1, progress_bar=False)
except RunStopped as exc:
    assert isinstance(exc, KeyboardInterrupt)
    print("RESULT " + json.dumps({{"status": exc.result.status.value, "success": exc.result.success_count,
                                   "stand_by": exc.result.metrics.stand_by}}))
    sys.exit(0)
print("not stopped")
sys.exit(3)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=cli_env(platform), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        _wait_for_writes(platform, project, proc, int(TASKS * STOP_AT))
        _hold_writes(platform)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    written = _written(platform, project)
    assert result["status"] == "STOPPED"
    assert result["success"] == len(written) == len(_successes(report))
    assert result["stand_by"] == TASKS - len(written)


def test_ray_job_stop_on_a_submitted_job_then_resume(slow_platform, tmp_path):
    """`ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default;
    README says to raise it): the job stops gracefully inside that wait."""
    platform = slow_platform
    project, ids, units, job, job_id = _project(platform, tmp_path, "jobstop")
    workdir = job.parent
    env = cli_env(platform, RAY_AUTH_MODE="token", RAY_JOB_STOP_WAIT_TIME_S="40")
    first = tmp_path / "first.jsonl"
    with ray_head(env, "raystop") as head:
        address = head.dashboard
        submit_id = f"totask_stop_{head.port}"
        sub = job_submit(
            head,
            [f"--working-dir={workdir}", f"--submission-id={submit_id}", "--no-wait",
             "--", "python", "-m", "totask_ray", "run", "job.yaml", "--report", str(first), "--job-id", str(job_id)],
            env,
        )  # fmt: skip
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-3000:]
        _wait_for_writes(platform, project, None, int(TASKS * STOP_AT))
        _hold_writes(platform)
        t0 = time.monotonic()
        stop = subprocess.run(
            [str(BIN / "ray"), "job", "stop", f"--address={address}", submit_id],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        exit_s = time.monotonic() - t0
        assert stop.returncode == 0, (stop.stdout + stop.stderr)[-2000:]
        logs = subprocess.run(
            [str(BIN / "ray"), "job", "logs", f"--address={address}", submit_id],
            env=env, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        assert "Stopped by SIGTERM" in logs, logs[-3000:]
        written = _written(platform, project)
        reported = _successes(first)
        assert len(written) < TASKS
        assert set(written) <= reported, f"{len(set(written) - reported)} writes are in no report"
        # resume on the same cluster, as a user would after `ray job stop`
        _added, rewritten = _resume_and_check(
            platform, project, ids, units, job, first, tmp_path, env, head.gcs
        )
        _row(
            "ray job stop (RAY_JOB_STOP_WAIT_TIME_S=40)", len(written), len(reported), rewritten, exit_s, 130
        )
