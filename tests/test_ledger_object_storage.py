"""The run ledger on object storage: with `--report s3://...` the ledger goes beside it on the bucket
(`<report>.ledger/<run id>/`), and `undo` / `diff` read it from there.

A local S3-compatible server (moto's, over real HTTP on 127.0.0.1: the fixtures of
tests/test_report_storage.py) reached through the S3 filesystem a user's run uses. The run is a
real file-method run on the embedded platform over a real local Ray; what is checked is what a user
checks: the objects on the bucket, and the tasks on the platform after `undo s3://...`. Also a run
whose driver is SIGKILLed mid-run: every write the platform holds is listed in the parts it left,
and the undo from the bucket restores them.
"""

# ruff: noqa: F811 - the tests take the S3 fixtures imported below as arguments

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import pytest
import yaml
from helpers import (
    BIN,
    cli_env,
    config_for,
    good_unit,
    make_project,
    wait_for_other_jobs_actors_gone,
    wait_until,
)
from test_report_storage import BUCKET, KEYS, _keys, s3, s3_env, s3_server  # noqa: F401 - the S3 fixtures
from typer.testing import CliRunner

from totask_ray import run_to_task
from totask_ray.cli import app
from totask_ray.errors import CriticalError
from totask_ray.ledger.record import LedgerWriter, digest
from totask_ray.ledger.store import (
    LedgerError,
    create_run,
    ledger_bytes,
    ledger_root,
    one_run,
    read_entries,
    run_dirs,
    start_run,
)
from totask_ray.ledger.undo import undo_run
from totask_ray.pipeline.spec import RunOptions


def _snapshot(platform, ids: list[int]) -> dict[int, object]:
    return {t: platform.store.get_task(t)["data"] or {} for t in ids}


def _seed(platform, n: int, name: str) -> tuple[int, list[int], list[dict]]:
    """`n` file-method tasks; every third already holds older data (an undo must put it back)."""
    units = [good_unit(platform, i, name) for i in range(n)]
    for i, u in enumerate(units):
        if i % 3 == 0:
            u["data"] = {"objects": [{"id": f"old{i}", "class_id": 2, "type": "bbox",
                                      "coordinates": {"x": 1, "y": 1, "width": 2, "height": 2},
                                      "properties": {"label": "y"}}]}  # fmt: skip
    project, ids = make_project(platform, units)
    return project, ids, units


def test_a_writer_puts_parts_that_read_back_as_a_run(s3):
    """Without a sink (no Ray) a writer puts one part per flush; the run reads back from the URI as
    it does from a directory: its runs, its entries, its size."""
    root = f"s3://{BUCKET}/unit/run.jsonl.ledger"
    spec = create_run(root, {"platform": "synapse", "host": "http://127.0.0.1:1", "project": 3})
    assert spec.path == f"{root}/{spec.run_id}"
    w = LedgerWriter(spec)
    w.before(1, {"objects": []}, {"objects": [{"id": "a"}]})
    asyncio.run(w.flush())
    w.written(1)
    w.before(2, None, {"objects": [{"id": "b"}]})  # never confirmed: the kill came first
    w.close()
    prefix = f"unit/run.jsonl.ledger/{spec.run_id}/"
    keys = _keys(s3, prefix)
    assert keys[-1] == prefix + "run.json" and len(keys) == 3, keys
    assert all(k.startswith(prefix + "parts/") for k in keys[:-1]), "one part per flush, one at close"
    assert "access_token" not in s3.get_object(Bucket=BUCKET, Key=prefix + "run.json")["Body"].read().decode()
    got = read_entries(spec.path)
    assert sorted(got) == [1, 2] and got[1].confirmed and not got[2].confirmed
    assert got[2].digest == digest({"objects": [{"id": "b"}]})
    assert run_dirs(root) == [spec.path] and one_run(root) == spec.path
    assert ledger_bytes(spec.path) == sum(
        s3.head_object(Bucket=BUCKET, Key=k)["ContentLength"] for k in keys[:-1]
    )


def test_errors_say_what_was_wrong_without_a_secret(s3_env):
    with pytest.raises(CriticalError) as created:
        start_run("s3://no-such-bucket-here/run.jsonl.ledger", _Params(), _Platform())
    text = str(created.value)
    assert "s3://no-such-bucket-here/run.jsonl.ledger" in text and "AWS_ENDPOINT_URL" in text
    assert "--no-ledger" in text
    with pytest.raises(LedgerError, match=f"No run ledger at s3://{BUCKET}/nothing-here"):
        run_dirs(f"s3://{BUCKET}/nothing-here")
    out = CliRunner().invoke(app, ["undo", "s3://no-such-bucket-here/x.ledger/r1"])
    assert out.exit_code == 1
    assert "undo failed:" in out.output and "s3://no-such-bucket-here/x.ledger/r1" in out.output
    for secret_or_trace in (KEYS["AWS_SECRET_ACCESS_KEY"], "Traceback"):
        assert secret_or_trace not in out.output + text


class _Params:
    project = 1

    def model_dump(self, mode: str) -> dict:
        return {"project": 1}


class _Platform:
    host = "http://127.0.0.1:1"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_run_reporting_to_s3_keeps_its_ledger_there_and_undo_from_s3_restores_it(platform, s3):
    project, ids, units = _seed(platform, 40, "s3ledger")
    snap = _snapshot(platform, ids)
    uri = f"s3://{BUCKET}/ledger-run/run.jsonl"
    job = {"name": "S3_Ledger", "project": project, "target_specification_name": "annotation_data"}
    result = run_to_task(job, platform=config_for(platform), report=uri, progress_bar=False, num_actors=2)
    assert result.success_count == 40, result.message
    assert result.ledger == f"{uri}.ledger/{result.run_id}"
    prefix = f"ledger-run/run.jsonl.ledger/{result.run_id}/"
    # the run closed its ledger: its parts composed into one object
    assert _keys(s3, prefix) == [prefix + "entries-sink.jsonl", prefix + "run.json"]
    assert sorted(read_entries(result.ledger)) == sorted(ids)
    for tid, unit in zip(ids, units, strict=True):
        assert platform.store.get_task(tid)["data"] == unit["expected"]
    env = {"SYNAPSE_ACCESS_TOKEN": platform.token}
    # `totask-ray diff s3://... current`: nobody reviewed yet, so every object is kept as written
    diff = CliRunner().invoke(app, ["diff", result.ledger, "current", "--json"], env=env)
    assert diff.exit_code == 0, diff.output
    totals = json.loads(diff.output)["totals"]
    assert totals["kept"] == 40 and sum(totals.values()) == 40, totals
    # `totask-ray undo s3://...`: every task back as it was
    history = platform.store.history_counts(project_id=project)
    out = CliRunner().invoke(app, ["undo", result.ledger], env=env)
    assert out.exit_code == 0, out.output
    assert _snapshot(platform, ids) == snap, "a task differs from what it held before the run"
    after = platform.store.history_counts(project_id=project)
    assert sum(after.values()) - sum(history.values()) == 40  # one write back per task
    assert any(k.startswith(prefix + "undo-") for k in _keys(s3, prefix)), "the undo report is on the bucket"
    # a second undo writes nothing
    second = undo_run(result.ledger, config_for(platform))
    assert second.restored == 0 and second.failed == 0 and second.already == 40
    assert platform.store.history_counts(project_id=project) == after


# --- a run whose driver is SIGKILLed mid-run --------------------------------------------------------

TASKS = 150


@pytest.mark.slow
def test_a_run_killed_mid_way_leaves_parts_on_s3_that_undo_every_write(
    slow_platform, ray_cluster, s3, s3_env, tmp_path
):
    platform = slow_platform
    project, ids, _ = _seed(platform, TASKS, "s3kill")
    snap = _snapshot(platform, ids)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "S3_Kill", "project": project,
                                   "target_specification_name": "annotation_data"}))  # fmt: skip
    uri = f"s3://{BUCKET}/ledger-kill/run.jsonl"
    address = ray_cluster.get_runtime_context().gcs_address
    env = cli_env(platform, **s3_env)
    proc = subprocess.Popen(
        [str(BIN / "totask-ray"), "run", str(job), "--report", uri, "--address", address],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: (
                len(platform.store.history_counts(project_id=project)) >= TASKS * 0.3
                or proc.poll() is not None
            ),
            f"{int(TASKS * 0.3)} tasks written before the kill",
            240,
            interval=0.05,
        )
        assert proc.poll() is None, f"the run ended before the kill: {proc.stdout.read()[-2000:]}"
        # each write waits from now on (the platform's fault injection), so the kill lands mid-run
        platform.set_faults(slow_rate=1.0, slow_s=1.0, path_regex="annotate_task_data", methods=["PUT"])
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        wait_for_other_jobs_actors_gone(ray_cluster)
    finally:
        platform.clear_faults()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    written = set(platform.store.history_counts(project_id=project))
    assert 0 < len(written) < TASKS, f"the kill did not land mid-run ({len(written)} of {TASKS} written)"
    run = one_run(f"{uri}.ledger")
    prefix = f"ledger-kill/run.jsonl.ledger/{run.rsplit('/', 1)[1]}/"
    keys = _keys(s3, prefix)
    assert prefix + "entries-sink.jsonl" not in keys, "a killed run composes nothing"
    assert any(k.startswith(prefix + "parts/") for k in keys), keys
    listed = set(read_entries(run))
    assert written <= listed, f"writes the ledger does not list: {sorted(written - listed)[:10]}"
    started = time.monotonic()
    out = CliRunner().invoke(app, ["undo", run], env={"SYNAPSE_ACCESS_TOKEN": platform.token})
    took = time.monotonic() - started
    assert out.exit_code == 0, out.output
    # every task the ledger lists is back as it was; the others were never written (no history)
    assert _snapshot(platform, ids) == snap
    history = platform.store.history_counts(project_id=project)
    assert set(history) == written, "the undo wrote to a task the run had not written"
    second = undo_run(run, config_for(platform))
    assert second.restored == 0 and second.failed == 0
    assert platform.store.history_counts(project_id=project) == history, "the second undo wrote"
    print(
        f"\nS3-LEDGER-KILL | tasks {TASKS} | written by the killed run {len(written)} | listed {len(listed)} "
        f"| parts {sum(k.startswith(prefix + 'parts/') for k in keys)} | undo {took:.1f} s |"
    )


def test_where_the_ledger_goes_when_the_report_or_ledger_is_a_uri(tmp_path):
    assert ledger_root(None, "s3://b/k/run.jsonl") == "s3://b/k/run.jsonl.ledger"
    assert ledger_root("gs://b/ledgers", "s3://b/k/run.jsonl") == "gs://b/ledgers"
    assert ledger_root(None, f"file://{tmp_path}/r.jsonl") == tmp_path / "r.jsonl.ledger"
    assert RunOptions(ledger="s3://b/ledgers").ledger == "s3://b/ledgers"  # not folded to "s3:/b"
    assert RunOptions(ledger=tmp_path / "L").ledger == str(tmp_path / "L")
