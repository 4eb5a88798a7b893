"""Reports and resume on object storage: a local S3-compatible server (moto's standalone server, over
real HTTP on 127.0.0.1) reached through the S3 filesystem a user's run uses (pyarrow's, configured by
the AWS_* environment, AWS_ENDPOINT_URL naming the server).

The fast tests drive `run/report_store.py` directly: parts flushed by count and by time, a writer
killed with SIGKILL mid-way (a real kill of a real process) and read back, a resume into the same
URI, duplicates left by a kill between composing and cleaning up, errors a user can act on. The slow
test is the issue's check: `totask-ray run --report s3://...` over a few hundred file-method tasks,
stopped with SIGTERM at about 30 %, then `--resume s3://...` ends with every task written once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import BIN, cli_env, good_unit, make_project, wait_until

from totask_ray.errors import CriticalError
from totask_ray.pipeline.spec import RunOptions
from totask_ray.run.report_store import done_records, open_report, read_records, report_exists, resolve
from totask_ray.run.steps import done_in_report

BUCKET = "totask-reports"
KEYS = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret-key"}


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on loopback and a free port; its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """The environment a user sets for an S3-compatible server (what the run reads, nothing else)."""
    env = {
        **KEYS,
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe on a machine that has none
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def s3(s3_env):
    """A boto3 client on the server: an independent reader of what the run wrote, and the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return client


def _keys(s3, prefix: str) -> list[str]:
    """The objects under `prefix`, less the empty folder markers ("a/") pyarrow's S3 filesystem
    leaves where it deleted the last object under a prefix."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    keys = (o for page in pages for o in page.get("Contents", []))
    return sorted(o["Key"] for o in keys if not (o["Key"].endswith("/") and o["Size"] == 0))


def _report_keys(s3, prefix: str) -> list[str]:
    """The report's objects under `prefix`: without the run ledgers kept beside it (`<report>.ledger/`)."""
    return [k for k in _keys(s3, prefix) if ".ledger/" not in k]


def _object_records(s3, key: str) -> dict[int, dict]:
    """The report object as a user downloads it: every line a record, each task once."""
    out: dict[int, dict] = {}
    for line in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode().splitlines():
        rec = json.loads(line)
        assert rec["task_id"] not in out, f"task {rec['task_id']} has two outcomes in the report"
        out[rec["task_id"]] = rec
    return out


def _line(tid: int, status: str = "success") -> str:
    return json.dumps({"task_id": tid, "status": status}) + "\n"


def _put(s3, key: str, ids: range, status: str = "success") -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body="".join(_line(t, status) for t in ids).encode())


def test_parts_by_count_then_one_object_at_close(s3, tmp_path):
    uri = f"s3://{BUCKET}/count/run.jsonl"
    report = open_report(uri, every_s=3600, every_lines=10)
    for tid in range(25):
        report.write(_line(tid))
    report.flush()
    parts = [k for k in _keys(s3, "count/") if k.startswith("count/run.jsonl.parts/")]
    assert len(parts) == 2, parts  # 10 + 10 written as they filled; 5 still pending
    assert sorted(r["task_id"] for r in read_records(uri)) == list(range(20))
    report.close()
    assert _keys(s3, "count/") == ["count/run.jsonl"], "the parts go once the report is whole"
    assert sorted(_object_records(s3, "count/run.jsonl")) == list(range(25))


def test_a_pending_part_goes_out_on_time_without_another_write(s3):
    """A quiet spell (no batch comes) does not hold outcomes back: the timer writes them."""
    uri = f"s3://{BUCKET}/timer/run.jsonl"
    report = open_report(uri, every_s=0.3, every_lines=1000)
    try:
        report.write(_line(1))
        wait_until(lambda: list(read_records(uri)), "the pending outcome written as a part by the timer", 10)
        assert [r["task_id"] for r in read_records(uri)] == [1]
    finally:
        report.close()


_KILLED_WRITER = """
import os, signal, sys
from totask_ray.run.report_store import open_report
report = open_report(sys.argv[1], every_s=3600, every_lines=10)
for tid in range(35):
    report.write('{"task_id": %d, "status": "success"}\\n' % tid)
    report.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_way_leaves_what_it_flushed_and_a_resume_completes_it(s3, s3_env):
    uri = f"s3://{BUCKET}/killed/run.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, uri],
        env={**os.environ, **s3_env},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert s3.get_object(Bucket=BUCKET, Key="killed/run.jsonl")["ContentLength"] == 0, (
        "a killed run never composed the report: its object is as empty as the run opened it"
    )
    # what it had flushed (3 parts of 10) is there to resume from; the 5 pending lines are lost
    assert list(done_in_report(uri)) == list(range(30))
    # the resume (into the same URI, as a retried RayJob does) writes the rest, then one object
    report = open_report(uri, carry_from=uri, every_s=3600, every_lines=10)
    for tid in range(30, 35):
        report.write(_line(tid))
    report.close()
    assert _keys(s3, "killed/") == ["killed/run.jsonl"]
    assert sorted(_object_records(s3, "killed/run.jsonl")) == list(range(35))


def test_records_read_twice_after_a_kill_between_compose_and_cleanup_are_carried_once(s3):
    """A kill after the report object was composed but before its parts went leaves each record
    twice: the done ids and the next carry count each task once; the failed one is run again."""
    uri = f"s3://{BUCKET}/twice/run.jsonl"
    _put(s3, "twice/run.jsonl", range(10))
    _put(s3, "twice/run.jsonl.parts/00000000000000000001-1/00000000.jsonl", range(5, 10))
    _put(s3, "twice/run.jsonl.parts/00000000000000000001-1/00000001.jsonl", range(10, 12), "failed")
    assert list(done_in_report(uri)) == list(range(10))
    assert [r["task_id"] for r in done_records(uri)] == list(range(10))
    report = open_report(uri, carry_from=uri, every_s=3600, every_lines=100)
    report.write(_line(10))
    report.write(_line(11, "failed"))
    report.close()
    final = _object_records(s3, "twice/run.jsonl")
    assert sorted(final) == list(range(12))
    assert final[10]["status"] == "success" and final[11]["status"] == "failed"
    assert _keys(s3, "twice/") == ["twice/run.jsonl"]


def test_a_new_run_at_a_used_uri_starts_empty_and_carries_only_what_it_resumes_from(s3, tmp_path):
    """Without --resume the URI's earlier report goes (a local file is truncated); with --resume from
    elsewhere (here a local report) only that one's done tasks are carried."""
    uri = f"s3://{BUCKET}/reused/run.jsonl"
    _put(s3, "reused/run.jsonl", range(100, 110))
    _put(s3, "reused/run.jsonl.parts/00000000000000000001-1/00000000.jsonl", range(110, 120))
    open_report(uri, every_s=3600).close()
    assert list(read_records(uri)) == []
    assert _keys(s3, "reused/") == ["reused/run.jsonl"]
    local = tmp_path / "earlier.jsonl"
    local.write_text(_line(1) + _line(2, "failed") + _line(3, "unchanged"))
    report = open_report(uri, carry_from=str(local), every_s=3600)
    report.write(_line(2))
    report.close()
    assert {t: r["status"] for t, r in _object_records(s3, "reused/run.jsonl").items()} == {
        1: "success",
        3: "unchanged",
        2: "success",
    }
    # and back: a local report resuming from the one in the bucket
    back = tmp_path / "back.jsonl"
    open_report(back, carry_from=uri).close()
    assert [json.loads(line)["task_id"] for line in back.read_text().splitlines()] == [1, 3, 2]


def test_errors_say_what_failed_and_where_to_look(s3_env, monkeypatch):
    with pytest.raises(CriticalError) as missing:
        open_report("s3://no-such-bucket-here/run.jsonl")
    text = str(missing.value)
    assert "s3://no-such-bucket-here/run.jsonl" in text and "AWS_ENDPOINT_URL" in text
    assert KEYS["AWS_SECRET_ACCESS_KEY"] not in text and "Traceback" not in text
    with pytest.raises(CriticalError, match="neither pyarrow nor fsspec knows this store"):
        open_report("nosuchscheme://bucket/run.jsonl")
    assert not report_exists(f"s3://{BUCKET}/absent.jsonl")
    with pytest.raises(
        CriticalError, match=re.escape(f"Resume report not found: s3://{BUCKET}/absent.jsonl")
    ):
        done_in_report(f"s3://{BUCKET}/absent.jsonl")


def test_any_fsspec_filesystem_serves_as_well():
    """A scheme pyarrow does not know goes through fsspec (its in-memory filesystem here)."""
    uri = "memory://totask-fsspec/run.jsonl"
    report = open_report(uri, every_s=3600, every_lines=2)
    for tid in range(3):
        report.write(_line(tid))
    report.close()
    assert [r["task_id"] for r in read_records(uri)] == [0, 1, 2]
    assert resolve(uri).parts() == []


def test_options_keep_a_uri_whole_and_take_a_path_as_before(tmp_path):
    assert RunOptions(report=tmp_path / "r.jsonl").report == str(tmp_path / "r.jsonl")
    assert RunOptions(report="s3://b/k/run.jsonl").report == "s3://b/k/run.jsonl"
    with pytest.raises(ValueError, match="resume_if_exists needs resume"):
        RunOptions(resume_if_exists=True)


# --- the check: a CLI run stopped with SIGTERM at about 30 %, resumed from the bucket ------

TASKS = 300
STOP_AT = 0.3


def _run(job: Path, address: str, *args: str) -> list[str]:
    return [str(BIN / "totask-ray"), "run", str(job), "--address", address, *args]


class _Case:
    """A seeded file-method project, the job file for it, and the CLI's environment (the platform's
    SYNAPSE_* variables and the AWS_* ones naming the S3 server)."""

    def __init__(self, platform, ray_cluster, s3_env: dict, tmp_path: Path, name: str):
        self.platform = platform
        self.units = [good_unit(platform, i, name) for i in range(TASKS)]
        self.project, self.ids = make_project(platform, self.units)
        self.job = tmp_path / "job.yaml"
        self.job.write_text(
            yaml.safe_dump(
                {"name": name, "project": self.project, "target_specification_name": "annotation_data"}
            )
        )
        self.env = cli_env(platform, **s3_env)
        self.address = ray_cluster.get_runtime_context().gcs_address
        self.uri = f"s3://{BUCKET}/{name}/run.jsonl"

    def written(self) -> dict[int, int]:
        """Per task, how many times the platform was written to (its write history)."""
        return self.platform.store.history_counts(project_id=self.project)

    def run_and_signal(self, sig: signal.Signals) -> tuple[int, int, str, float]:
        """`totask-ray run --report URI`, and `sig` once about 30 % of the tasks are written; the
        writes held from then on (the platform's fault injection: a real platform cannot be slowed
        on cue), so the signal lands before the run could end on its own."""
        started = time.monotonic()
        proc = subprocess.Popen(
            _run(self.job, self.address, "--report", self.uri),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_until(
                lambda: len(self.written()) >= TASKS * STOP_AT or proc.poll() is not None,
                f"{int(TASKS * STOP_AT)} tasks written before the stop",
                240,
                interval=0.05,
            )
            assert proc.poll() is None, f"the run ended before the stop: {proc.stdout.read()[-2000:]}"
            self.platform.set_faults(
                slow_rate=1.0, slow_s=1.5, path_regex="annotate_task_data", methods=["PUT"]
            )
            at_signal = len(self.written())
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            self.platform.clear_faults()
        return proc.returncode, at_signal, out, time.monotonic() - started

    def resume_and_check(self, s3) -> tuple[dict[int, dict], str, float]:
        """`--report URI --resume URI` (the same URI, as a retried RayJob runs it), then what a user
        checks on the platform: every task holds its data, none was written twice, and the report
        in the bucket holds each task once."""
        started = time.monotonic()
        resumed = subprocess.run(
            _run(self.job, self.address, "--report", self.uri, "--resume", self.uri),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        took = time.monotonic() - started
        logs = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, logs[-3000:]
        after = self.written()
        for tid, unit in zip(self.ids, self.units, strict=True):
            assert self.platform.store.get_task(tid)["data"] == unit["expected"], f"task {tid} lacks its data"
        rewritten = sorted(t for t, n in after.items() if n > 1)
        assert not rewritten, f"written twice: {rewritten[:10]}"
        assert set(after) == set(self.ids)
        key = self.uri.removeprefix(f"s3://{BUCKET}/")
        assert _report_keys(s3, key.rsplit("/", 1)[0] + "/") == [key], "the parts go once the report is whole"
        final = _object_records(s3, key)
        assert sorted(final) == sorted(self.ids)
        assert KEYS["AWS_SECRET_ACCESS_KEY"] not in logs
        return final, logs, took


@pytest.mark.slow
def test_sigterm_at_30_percent_then_resume_from_s3_writes_every_task_once(
    slow_platform, ray_cluster, s3, s3_env, tmp_path
):
    case = _Case(slow_platform, ray_cluster, s3_env, tmp_path, "sigterm")
    code, at_signal, out, first_s = case.run_and_signal(signal.SIGTERM)
    assert code == 130, out[-3000:]
    assert "Stopped by SIGTERM" in out
    before = case.written()
    assert 0 < len(before) < TASKS, "the run finished before the stop: nothing was tested"
    # the stop closed the report: one object, every write the platform holds in it as a success
    assert _report_keys(s3, "sigterm/") == ["sigterm/run.jsonl"]
    stopped = _object_records(s3, "sigterm/run.jsonl")
    assert {t for t, r in stopped.items() if r["status"] == "success"} == set(before)

    final, logs, resume_s = case.resume_and_check(s3)
    assert f"resuming: {len(before)} task(s) already done in {case.uri} are skipped" in logs
    assert {r["status"] for r in final.values()} == {"success"}
    print(
        f"\nS3-STOP | SIGTERM | tasks {TASKS} | written at the signal {at_signal} | written by the stopped run "
        f"{len(before)} (the tasks in flight finish) | in the report {len(stopped)} | first run {first_s:.1f} s "
        f"| resume {resume_s:.1f} s | written twice 0 |"
    )


@pytest.mark.slow
def test_sigkill_then_resume_from_s3_loses_nothing_and_writes_nothing_twice(
    slow_platform, ray_cluster, s3, s3_env, tmp_path
):
    """A hard kill composes nothing: the report is the parts flushed before it. The tasks written
    after the last part are in no report; the resume runs them again and finds them already
    written (`unchanged`: the file method compares before it writes)."""
    import ray._private.state as ray_state

    case = _Case(slow_platform, ray_cluster, s3_env, tmp_path, "sigkill")
    code, at_signal, out, first_s = case.run_and_signal(signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-3000:]
    # the killed driver's annotator actors may finish a write while Ray ends them: wait for them to
    # go (the GCS's actor table, read through this driver: the suite's Ray runs without a dashboard,
    # so the state API has nothing to ask; Ray is pinned, so this private reader is fixed)
    mine = ray_cluster.get_runtime_context().get_job_id()

    def theirs_alive() -> list[str]:
        actors = ray_state.actors().values()
        # (Ray Data's detached helpers outlive every run by design: not the run's)
        return [
            a["ActorClassName"]
            for a in actors
            if a["State"] != "DEAD" and a["JobID"] != mine and not a["IsDetached"]
        ]

    wait_until(lambda: not theirs_alive(), "the killed run's actors to be gone", 120, interval=0.5)
    before = case.written()
    assert 0 < len(before) < TASKS
    reported = {r["task_id"] for r in done_records(case.uri)}
    assert reported <= set(before), "the report holds a success the platform does not"

    final, logs, resume_s = case.resume_and_check(s3)
    assert f"resuming: {len(reported)} task(s) already done" in logs
    unreported = set(before) - reported
    assert {t for t in unreported if final[t]["status"] == "unchanged"} == unreported
    print(
        f"\nS3-STOP | SIGKILL | tasks {TASKS} | written at the signal {at_signal} | written by the killed run "
        f"{len(before)} | in the report's parts {len(reported)} | found unchanged by the resume {len(unreported)} "
        f"| first run {first_s:.1f} s | resume {resume_s:.1f} s | written twice 0 |"
    )
