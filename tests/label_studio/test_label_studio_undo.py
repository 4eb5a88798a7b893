"""`undo` on a real Label Studio (issue 27's property test, its Label Studio half).

Predictions: run; a person makes an annotation from the prediction on 20 % of the tasks (a moved
box, a deleted region, a changed label: each a human edit); undo. Every untouched task holds what
it held before the run (no prediction, no annotation), every edited task keeps its prediction and
the person's annotation and is listed, and a second undo deletes nothing. Annotations
(`write: annotations`): a person updates 20 % of the run's annotations; undo deletes exactly the
others. And with the first run, made by the CLI, stopped by SIGTERM at about 30 %: the ledger it
leaves undoes every prediction Label Studio holds, the unconfirmed ones included.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import png, wait_for_other_jobs_actors_gone
from ls_helpers import media_host

from totask_ray import run_to_task
from totask_ray.ledger.store import one_run, read_entries
from totask_ray.ledger.undo import undo_run
from totask_ray.platform.label_studio.config import LabelStudioConfig

pytestmark = pytest.mark.usefixtures("ray_cluster")

CONFIG = """
<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="dog"/></RectangleLabels>
</View>
"""


def _objects(i: int) -> dict[str, Any]:
    return {"objects": [
        {"id": f"b{k}", "class_id": (i + k) % 2, "type": "bbox",
         "coordinates": {"x": 10 + 60 * k, "y": 20, "width": 40, "height": 30}}
        for k in range(2)
    ]}  # fmt: skip


def _project(ls: Any, media: tuple[str, Any], n: int) -> tuple[int, list[int]]:
    url, handler = media
    project = ls.admin.create_project(f"undo-{random.randrange(10**9)}", CONFIG)
    body = png(np.full((100, 200, 3), 120, np.uint8))
    rows = []
    for i in range(n):
        key = f"{project['id']}-{i}"
        handler.files[f"/img/{key}.png"] = ("image/png", body)
        handler.files[f"/ann/{key}.json"] = ("application/json", json.dumps(_objects(i)).encode())
        rows.append({"image": f"{url}/img/{key}.png", "annotation": f"{url}/ann/{key}.json"})
    return project["id"], ls.admin.import_tasks(project["id"], rows)


def _held(ls: Any, pid: int) -> dict[int, tuple[list[int], list[int]]]:
    """Each task's prediction ids and annotation ids."""
    return {
        t["id"]: (sorted(p["id"] for p in t["predictions"]), sorted(a["id"] for a in t["annotations"]))
        for t in ls.admin.list_tasks(pid)
    }


def _edit(result: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """A person's change to a result: a moved box, a deleted region, a changed label, in turn."""
    out = copy.deepcopy(result)
    if n % 3 == 0:
        out[0]["value"]["x"] += 10
    elif n % 3 == 1:
        out.pop()
    else:
        labels = out[0]["value"]["rectanglelabels"]
        out[0]["value"]["rectanglelabels"] = ["dog" if labels == ["cat"] else "cat"]
    return out


def _run(pid: int, config: LabelStudioConfig, report) -> Any:
    params = {
        "name": "ls_undo_job",
        "project": pid,
        "method": "file",
        "target_specification_name": "annotation",
    }
    result = run_to_task(
        params, platform=config, allowed_hosts=["127.0.0.1"], progress_bar=False, report=report
    )
    assert result.failed_count == 0 and result.ledger, result.message
    return result


def test_undo_deletes_the_runs_predictions_and_spares_annotations_made_from_them(
    label_studio, media, tmp_path
):
    ls = label_studio
    pid, ids = _project(ls, media, 20)
    snap = _held(ls, pid)
    config = LabelStudioConfig(host=ls.url, api_key=ls.personal_token)
    result = _run(pid, config, tmp_path / "r.jsonl")
    tasks = {t["id"]: t for t in ls.admin.list_tasks(pid)}
    assert all(len(tasks[t]["predictions"]) == 1 for t in ids)
    edited = {}
    for n, tid in enumerate(random.Random(27).sample(ids, 4)):  # 20 %: annotations made from the prediction
        pred = tasks[tid]["predictions"][0]
        body = {"result": _edit(pred["result"], n), "parent_prediction": pred["id"], "was_cancelled": False}
        r = ls.admin.http.post(f"/api/tasks/{tid}/annotations/", json=body)
        assert r.status_code == 201, r.text
        edited[tid] = r.json()["id"]
    first = undo_run(result.ledger, config.for_job("ls_undo_job", pid))
    assert first.failed == 0, first.failures
    assert first.restored == len(ids) - len(edited)
    held = _held(ls, pid)
    for tid in ids:
        if tid in edited:
            assert held[tid][1] == [edited[tid]] and len(held[tid][0]) == 1, (
                f"task {tid} lost the person's work"
            )
        else:
            assert held[tid] == snap[tid], f"task {tid} differs from before the run"
    kept = {k.task_id: k.detail for k in first.kept_tasks}
    assert set(kept) == set(edited) and all("was made from prediction" in d for d in kept.values())
    second = undo_run(result.ledger, config.for_job("ls_undo_job", pid))
    assert second.restored == 0 and second.failed == 0 and _held(ls, pid) == held


def test_undo_deletes_the_runs_annotations_but_not_those_a_person_updated(label_studio, media, tmp_path):
    ls = label_studio
    pid, ids = _project(ls, media, 10)
    config = LabelStudioConfig(host=ls.url, api_key=ls.personal_token, write="annotations")
    result = _run(pid, config, tmp_path / "r.jsonl")
    tasks = {t["id"]: t for t in ls.admin.list_tasks(pid)}
    updated = {}
    for n, tid in enumerate(random.Random(5).sample(ids, 2)):
        [ann] = tasks[tid]["annotations"]
        r = ls.admin.http.patch(f"/api/annotations/{ann['id']}/", json={"result": _edit(ann["result"], n)})
        assert r.status_code == 200, r.text
        updated[tid] = ann["id"]
    first = undo_run(result.ledger, config.for_job("ls_undo_job", pid))
    assert first.failed == 0 and first.restored == len(ids) - len(updated), first
    held = _held(ls, pid)
    for tid in ids:
        assert held[tid][1] == ([updated[tid]] if tid in updated else []), f"task {tid}"
    assert {k.task_id for k in first.kept_tasks} == set(updated)
    second = undo_run(result.ledger, config.for_job("ls_undo_job", pid))
    assert second.restored == 0 and _held(ls, pid) == held


@pytest.fixture
def slow_media() -> Iterator[tuple[str, Any]]:
    """The media host, each answer held 0.05 s (the test raises it): the run's pace, so that a
    SIGTERM lands mid-run."""
    with media_host(delay_s=0.05) as host:
        yield host


def _with_prediction(ls: Any, pid: int, model_version: str) -> set[int]:
    return {p["task"] for p in ls.admin.predictions(pid) if p["model_version"] == model_version}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_undo_after_a_signal_at_30_percent(label_studio, slow_media, ray_cluster, tmp_path, sig):
    """The CLI's run (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY) stopped by SIGTERM, or killed by
    SIGKILL, once about 30 % of the tasks hold its prediction; a person makes annotations from the
    predictions of 20 % of the tasks it wrote; undo. Every untouched task is as in the snapshot,
    every edited one keeps the prediction and the person's annotation and is listed, and a second
    undo deletes nothing. After a SIGKILL a bulk write may have landed without its `w` line: undo
    finds such a task's prediction by the run's model_version (an unconfirmed write)."""
    ls = label_studio
    n = 60
    pid, ids = _project(ls, slow_media, n)
    snap = _held(ls, pid)
    job = tmp_path / "job.yaml"
    name = f"ls_undo_{sig.name.lower()}"
    job.write_text(yaml.safe_dump({"name": name, "project": pid, "method": "file",
                                   "target_specification_name": "annotation"}))  # fmt: skip
    report = tmp_path / "first.jsonl"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SYNAPSE_", "LABEL_STUDIO_"))
    }
    env.update(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.personal_token, RAY_USAGE_STATS_ENABLED="0")
    exe = Path(sys.executable).with_name("totask-ray")
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [str(exe), "run", str(job), "--allow-host", "127.0.0.1", "--address", address, "--report", str(report),
         "--num-actors", "1", "--concurrency", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(_with_prediction(ls, pid, name)) < int(n * 0.3):
            assert proc.poll() is None, (
                f"the run ended before it could be stopped: {proc.stdout.read()[-2000:]}"
            )
            assert time.monotonic() < deadline, "the run wrote too little to be stopped at 30 %"
            time.sleep(0.2)
        slow_media[1].delay_s = 2.0  # the tasks in flight finish slowly: the stop lands mid-run
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=180)
        if sig == signal.SIGKILL:
            slow_media[1].delay_s = 0.0
            wait_for_other_jobs_actors_gone(ray_cluster)  # their last writes may still land
    finally:
        slow_media[1].delay_s = 0.0
        if proc.poll() is None:
            proc.kill()
    assert ls.personal_token not in out
    written = _with_prediction(ls, pid, name)
    assert 0 < len(written) < n, (
        f"the stop did not land mid-run ({len(written)} of {n} written): {out[-2000:]}"
    )
    ledger = one_run(Path(str(report) + ".ledger"))
    entries = read_entries(ledger)
    listed = set(entries)
    assert written <= listed, f"predictions the ledger does not list: {sorted(written - listed)[:10]}"
    unconfirmed = sum(1 for tid in written if not entries[tid].confirmed)
    print(f"\nLS-UNDO | {sig.name} | written {len(written)} of {n} | unconfirmed writes {unconfirmed}")

    tasks = {t["id"]: t for t in ls.admin.list_tasks(pid)}
    edited = {}
    for k, tid in enumerate(random.Random(30).sample(sorted(written), max(1, round(len(written) * 0.2)))):
        pred = tasks[tid]["predictions"][0]
        body = {"result": _edit(pred["result"], k), "parent_prediction": pred["id"], "was_cancelled": False}
        r = ls.admin.http.post(f"/api/tasks/{tid}/annotations/", json=body)
        assert r.status_code == 201, r.text
        edited[tid] = r.json()["id"]

    config = LabelStudioConfig(host=ls.url, api_key=ls.personal_token).for_job(name, pid)
    first = undo_run(ledger, config)
    assert first.failed == 0, first.failures
    assert first.restored == len(written) - len(edited), (first.restored, len(written), len(edited))
    held = _held(ls, pid)
    for tid in ids:
        if tid in edited:
            assert held[tid][1] == [edited[tid]] and len(held[tid][0]) == 1, (
                f"task {tid} lost the person's work"
            )
        else:
            assert held[tid] == snap[tid], f"task {tid} differs from before the run"
    kept = {k.task_id: k.detail for k in first.kept_tasks}
    assert set(kept) == set(edited) and all("was made from prediction" in d for d in kept.values())
    second = undo_run(ledger, config)
    assert second.restored == 0 and second.failed == 0 and _held(ls, pid) == held
    assert {k.task_id for k in second.kept_tasks} == set(edited)
