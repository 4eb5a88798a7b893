"""The run ledger and `undo` on the embedded platform: the property test of issue 27.

Snapshot a seeded project; run (with `on_success`, so the workflow is part of what is undone);
a person edits 20 % of the written tasks through the platform's API (a moved box, a deleted
object, a changed class); undo. Every untouched task equals the snapshot (data, status), every
edited task keeps its edit and is listed with what changed, and a second undo writes nothing (the
platform's annotation history and statuses do not move). Also with the run stopped by SIGTERM
at about 30 %: the ledger it leaves undoes every write the platform holds.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import BIN, cli_env, config_for, make_project, write_media
from typer.testing import CliRunner

from totask_ray import run_to_task
from totask_ray.cli import app
from totask_ray.ledger.store import one_run, read_entries
from totask_ray.ledger.undo import undo_run

pytestmark = pytest.mark.slow
CLASSES = {1: "car", 2: "person", 3: "tree"}


def _objects(i: int, n: int = 3, prefix: str = "m") -> dict[str, Any]:
    """`n` boxes side by side, never overlapping (so each edit is told apart from the others)."""
    return {
        "objects": [
            {"id": f"{prefix}{i}_{k}", "class_id": (i + k) % 3 + 1, "type": "bbox",
             "coordinates": {"x": 10.0 + 60 * k, "y": 10.0, "width": 40.0, "height": 40.0},
             "properties": {"label": CLASSES[(i + k) % 3 + 1]}}
            for k in range(n)
        ]
    }  # fmt: skip


def _seed(platform, n: int, name: str) -> tuple[int, list[int]]:
    """`n` tasks, each with a model JSON of 3 boxes; every third task already holds older data."""
    img = write_media(platform, f"{name}/img.png", b"\x89PNG\r\n\x1a\n")
    units = []
    for i in range(n):
        rel = write_media(platform, f"{name}/ann_{i}.json", _objects(i))
        units.append(
            {"files": {"image_1": {"path": img}, "annotation_data": {"path": rel}},
             "data": _objects(i, 1, "old") if i % 3 == 0 else {}}
        )  # fmt: skip
    return make_project(platform, units)


def _snapshot(platform, ids: list[int]) -> dict[int, tuple[Any, str]]:
    return {t: (platform.store.get_task(t)["data"] or {}, platform.store.get_task(t)["status"]) for t in ids}


def _human_edits(platform, ids: list[int], share: float, seed: int) -> dict[int, tuple[str, Any]]:
    """A person's edits through the API to `share` of `ids`: a moved box, a deleted object, a
    changed class, in turn. Returns task id -> (what was done, the data it now holds)."""
    rng = random.Random(seed)
    chosen = rng.sample(ids, max(1, round(len(ids) * share)))
    edits = {}
    for n, tid in enumerate(chosen):
        data = json.loads(json.dumps(platform.store.get_task(tid)["data"]))
        obj = data["objects"][rng.randrange(len(data["objects"]))]
        kind = ("moved", "deleted", "relabelled")[n % 3]
        if kind == "moved":
            obj["coordinates"]["x"] += 20.0  # IoU 1/3 with where the model put it
        elif kind == "deleted":
            data["objects"].remove(obj)
        else:
            obj["class_id"] = obj["class_id"] % 3 + 1
            obj["properties"]["label"] = CLASSES[obj["class_id"]]
        r = httpx.put(f"{platform.url}/tasks/{tid}/annotate_task_data/", json={"action": "submit", "data": data},
                      headers=platform.headers)  # fmt: skip
        r.raise_for_status()
        edits[tid] = (kind, data)
    return edits


def _check_undo(platform, project: int, ids: list[int], snap, edits, ledger: Path, written: set[int]) -> None:
    history = platform.store.history_counts(project_id=project)
    first = undo_run(ledger, config_for(platform))
    assert first.failed == 0, first.failures
    assert first.restored == len(written - set(edits)), (first.restored, len(written), len(edits))
    for tid in ids:
        task = platform.store.get_task(tid)
        if tid in edits:
            assert task["data"] == edits[tid][1], f"task {tid}: the person's edit was not kept"
        else:
            assert (task["data"] or {}, task["status"]) == snap[tid], f"task {tid} differs from the snapshot"
    kept = {k.task_id: k.detail for k in first.kept_tasks}
    assert set(kept) == set(edits), "every edited task is listed, and only those"
    for tid, (kind, _) in edits.items():
        assert f"1 {kind}" in kept[tid], f"task {tid} ({kind}) listed as: {kept[tid]}"
    assert first.workflow_reverted == len(written - set(edits))
    restored_history = platform.store.history_counts(project_id=project)
    assert sum(restored_history.values()) - sum(history.values()) == first.restored  # one PUT each
    statuses = {t: platform.store.get_task(t)["status"] for t in ids}
    second = undo_run(ledger, config_for(platform))
    assert second.writes == 0 and second.restored == 0 and second.failed == 0
    assert platform.store.history_counts(project_id=project) == restored_history, "the second undo wrote"
    assert {t: platform.store.get_task(t)["status"] for t in ids} == statuses
    assert {k.task_id for k in second.kept_tasks} == set(edits)


@pytest.mark.usefixtures("ray_cluster")
def test_undo_restores_untouched_tasks_and_spares_human_edits(platform, tmp_path):
    project, ids = _seed(platform, 60, "undo1")
    snap = _snapshot(platform, ids)
    job = {"name": "Undo_Job", "project": project, "target_specification_name": "annotation_data",
           "on_success": {"status": "in_review"}}  # fmt: skip
    report = tmp_path / "run.jsonl"
    result = run_to_task(job, platform=config_for(platform), report=report, progress_bar=False, num_actors=2)
    assert result.success_count == 60 and result.run_id and result.ledger
    assert Path(result.ledger).parent == tmp_path / "run.jsonl.ledger"
    assert all(platform.store.get_task(t)["status"] == "in_review" for t in ids)
    # the dry run says what would be done and writes nothing
    history = platform.store.history_counts(project_id=project)
    dry = undo_run(result.ledger, config_for(platform), dry_run=True)
    assert dry.restored == 60 and platform.store.history_counts(project_id=project) == history
    edits = _human_edits(platform, ids, 0.2, seed=27)
    # `diff LEDGER current`: what the people did, counted as they did it
    env = {"SYNAPSE_ACCESS_TOKEN": platform.token}
    out = CliRunner().invoke(app, ["diff", result.ledger, "current", "--json"], env=env)
    assert out.exit_code == 0, out.output
    totals = json.loads(out.output)["totals"]
    done = Counter(kind for kind, _ in edits.values())
    assert {k: totals[k] for k in ("moved", "deleted", "relabelled", "added")} == {
        "moved": done["moved"], "deleted": done["deleted"], "relabelled": done["relabelled"], "added": 0
    }  # fmt: skip
    assert totals["kept"] == 60 * 3 - len(edits)
    # the CLI's dry run: what would be undone, exit 0, nothing written
    history = platform.store.history_counts(project_id=project)
    dry_cli = CliRunner().invoke(app, ["undo", result.ledger, "--dry-run"], env=env)
    assert dry_cli.exit_code == 0, dry_cli.output
    assert "dry run" in dry_cli.output and platform.store.history_counts(project_id=project) == history
    _check_undo(platform, project, ids, snap, edits, Path(result.ledger), set(ids))


def test_undo_after_sigterm_at_30_percent(slow_platform, ray_cluster, tmp_path):
    platform = slow_platform
    n = 300
    project, ids = _seed(platform, n, "undo2")
    snap = _snapshot(platform, ids)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "Undo_Stop", "project": project,
                                   "target_specification_name": "annotation_data",
                                   "on_success": {"status": "in_review"}}))  # fmt: skip
    report = tmp_path / "first.jsonl"
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [str(BIN / "totask-ray"), "run", str(job), "--report", str(report), "--address", address],
        env=cli_env(platform), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(platform.store.history_counts(project_id=project)) < int(n * 0.3):
            assert proc.poll() is None, (
                f"the run ended before it could be stopped: {proc.stdout.read()[-2000:]}"
            )
            assert time.monotonic() < deadline, "the run wrote too little to be stopped at 30 %"
            time.sleep(0.05)
        # each write waits from now on (the platform's fault injection), so the stop lands mid-run
        platform.set_faults(slow_rate=1.0, slow_s=1.0, path_regex="annotate_task_data", methods=["PUT"])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        platform.clear_faults()
        if proc.poll() is None:
            proc.kill()
    written = set(platform.store.history_counts(project_id=project))
    assert 0 < len(written) < n, (
        f"the stop did not land mid-run ({len(written)} of {n} written): {out[-2000:]}"
    )
    ledger = one_run(Path(str(report) + ".ledger"))
    listed = set(read_entries(ledger))
    assert written <= listed, f"writes the ledger does not list: {sorted(written - listed)[:10]}"
    edits = _human_edits(platform, sorted(written), 0.2, seed=30)
    _check_undo(platform, project, ids, snap, edits, ledger, written)
