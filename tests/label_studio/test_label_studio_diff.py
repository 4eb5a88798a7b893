"""`totask-ray diff LEDGER current` on Label Studio (issue 27).

Label Studio holds results (percentages of the image, one region per keypoint, OCR text in a
second region), so both sides are read back into the object model the diff matches on
(`platform/label_studio/to_objects.py`); "current" is a person's annotation where one reviews the
run, else the run's prediction (`ledger/ls_current.py`). The server test makes the edits a
reviewer makes in the UI (annotations made from the predictions: a moved box, a deleted region, a
changed label, an added box, a changed choice, an accepted prediction, a skipped task), and the
diff's counts must equal the test's own count of them.
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from helpers import png
from typer.testing import CliRunner

from totask_ray import run_to_task
from totask_ray.cli import app
from totask_ray.ledger.diff import compare_task
from totask_ray.ledger.ls_current import current_result
from totask_ray.ledger.store import Entry, RunHeader
from totask_ray.platform.label_studio.config import LabelStudioConfig
from totask_ray.platform.label_studio.convert import to_results
from totask_ray.platform.label_studio.labeling import parse_labeling_config
from totask_ray.platform.label_studio.to_objects import as_stored, from_results

CONFIG = """
<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <PolygonLabels name="poly" toName="img"><Label value="road"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="img"><Label value="eye"/></KeyPointLabels>
  <Choices name="scene" toName="img"><Choice value="indoor"/><Choice value="outdoor"/></Choices>
</View>
"""
OCR_CONFIG = """
<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="word"/></RectangleLabels>
  <TextArea name="text" toName="img" perRegion="true" editable="true"/>
</View>
"""
W, H = 200, 100


def _objects(i: int) -> dict[str, Any]:
    """Every shape the config takes, by class id only (as a model file gives them): two boxes side
    by side, a polygon, a keypoint, a choice."""
    return {"objects": [
        {"id": "b1", "class_id": i % 2, "type": "bbox", "coordinates": {"x": 10, "y": 20, "width": 40, "height": 30}},
        {"id": "b2", "class_id": (i + 1) % 2, "type": "bbox",
         "coordinates": {"x": 100, "y": 20, "width": 40, "height": 30}},
        {"id": "p1", "class_id": 2, "type": "polygon", "coordinates": {"points": [[0, 60], [60, 60], [60, 95]]}},
        {"id": "k1", "class_id": 3, "type": "keypoint", "coordinates": {"points": [[150, 80]]}},
        {"id": "c1", "class_id": 4, "type": "classification"},
    ]}  # fmt: skip


def _classes(text: str) -> tuple[Any, dict[int, str]]:
    labeling = parse_labeling_config(text)
    return labeling, dict(enumerate(labeling.labels))


def test_results_read_back_as_the_objects_written():
    """The object model through `to_results` and back is what `as_stored` says Label Studio keeps:
    every object kept, in pixels, keypoints one per point, OCR text on its rectangle."""
    labeling, classes = _classes(CONFIG)
    data = _objects(1)
    data["objects"][3]["coordinates"]["points"].append([160.5, 70.25])  # a keypoint of two points
    results, _ = to_results(data, labeling, classes, (W, H))
    back = from_results(results, classes)
    assert back.unread == 0
    stored = as_stored(data, labeling, classes)
    assert len(stored["objects"]) == 6  # the keypoint of two points is two objects
    diff = compare_task(1, stored, back.data)
    assert diff.counts == {"kept": 6, "moved": 0, "relabelled": 0, "deleted": 0, "added": 0}
    box = next(o for o in back.objects if o["id"] == "b1")
    assert box["properties"]["label"] == "dog" and box["class_id"] == 1
    assert box["coordinates"] == pytest.approx({"x": 10, "y": 20, "width": 40, "height": 30})

    ocr, ocr_classes = _classes(OCR_CONFIG)
    words = {"objects": [{"id": "w1", "class_id": 0, "type": "bbox", "properties": {"text": "EXIT"},
                          "coordinates": {"x": 10, "y": 10, "width": 50, "height": 20}}]}  # fmt: skip
    results, _ = to_results(words, ocr, ocr_classes, (W, H))
    assert [r["type"] for r in results] == ["rectanglelabels", "textarea"]
    back = from_results(results, ocr_classes)
    assert back.objects[0]["properties"] == {"label": "word", "text": "EXIT"}
    assert compare_task(2, as_stored(words, ocr, ocr_classes), back.data).counts["kept"] == 1
    results[1]["value"]["text"] = ["EX1T"]  # a person corrected the transcription
    assert compare_task(2, words, from_results(results, ocr_classes).data).counts["relabelled"] == 1


def test_a_rotated_box_reads_as_its_bounding_box_and_sizes_come_from_the_task():
    _, classes = _classes(CONFIG)
    rotated = {"id": "r", "type": "rectanglelabels", "original_width": W, "original_height": H,
               "value": {"x": 50, "y": 10, "width": 10, "height": 20, "rotation": 90, "rectanglelabels": ["cat"]}}  # fmt: skip
    [box] = from_results([rotated], classes).objects
    # 20 x 20 px turned a quarter about its top-left corner (100, 10): x from 80 to 100
    assert box["coordinates"] == pytest.approx({"x": 80, "y": 10, "width": 20, "height": 20})
    bare = {"id": "n", "type": "rectanglelabels", "value": {"x": 10, "y": 10, "width": 10, "height": 10,
                                                              "rectanglelabels": ["dog"]}}  # fmt: skip
    assert from_results([bare], classes).unread == 1  # no size anywhere on the task
    [sized] = from_results([bare], classes, fallback=(W, H)).objects
    assert sized["coordinates"] == pytest.approx({"x": 20, "y": 10, "width": 20, "height": 10})
    brush = {"id": "m", "type": "brushlabels", "value": {"format": "rle", "rle": [1]}}
    assert from_results([brush], classes).unread == 1


def _header(write: str | None = None) -> RunHeader:
    return RunHeader(run_id="r", started_at="2026-01-01T00:00:00+00:00", platform="label-studio",
                     host="http://127.0.0.1:1", project=1, model_version="m1", write=write)  # fmt: skip


AT = 1_800_000_000.0  # when the run wrote the task (unix seconds)


def _stamp(offset_s: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(AT + offset_s, UTC).isoformat().replace("+00:00", "Z")


def test_current_is_the_review_of_the_run_else_its_prediction():
    """Which of a task's results is 'current' (the order `ls_current` documents)."""
    entry = Entry(task_id=1, at=AT, writes_data=True, confirmed=True,
                  created={"kind": "prediction", "id": 7, "digest": "x"})  # fmt: skip
    pred = {"id": 7, "model_version": "m1", "result": ["P"]}
    old = {"id": 1, "result": ["OLD"], "created_at": _stamp(-3600), "updated_at": _stamp(-3600)}
    raw: dict[str, Any] = {"predictions": [pred], "annotations": [old]}
    assert current_result(raw, entry, _header()) == ("prediction", ["P"])  # an older annotation is no review
    raw["annotations"].append({"id": 2, "result": ["SKIP"], "was_cancelled": True, "created_at": _stamp(60)})
    assert current_result(raw, entry, _header()) == ("prediction", ["P"])  # a skipped task is no review
    raw["annotations"].append({"id": 3, "result": ["FROM"], "parent_prediction": 7, "created_at": _stamp(60),
                               "updated_at": _stamp(60)})  # fmt: skip
    raw["annotations"].append(
        {"id": 4, "result": ["LATER"], "created_at": _stamp(120), "updated_at": _stamp(120)}
    )
    assert current_result(raw, entry, _header()) == ("annotation", ["LATER"])  # the newest review
    assert current_result({"predictions": [], "annotations": [old]}, entry, _header()) is None
    # a write the stopped run never confirmed: its prediction is the task's newest of the model version
    unconfirmed = Entry(task_id=1, at=AT, writes_data=True)
    two = {"predictions": [pred, {"id": 9, "model_version": "m1", "result": ["P9"]},
                           {"id": 11, "model_version": "other", "result": ["X"]}]}  # fmt: skip
    assert current_result(two, unconfirmed, _header()) == ("prediction", ["P9"])
    # write: annotations: the run's own annotation as a person left it
    mine = Entry(task_id=1, at=AT, writes_data=True, confirmed=True,
                 created={"kind": "annotation", "id": 5, "digest": "x"})  # fmt: skip
    own = {"id": 5, "result": ["EDITED"], "created_at": _stamp(1), "updated_at": _stamp(30)}
    assert current_result({"annotations": [old, own]}, mine, _header("annotations")) == (
        "annotation",
        ["EDITED"],
    )


# --- against a real Label Studio ---------------------------------------------------------------


def _project(ls: Any, media: tuple[str, Any], n: int) -> tuple[int, list[int]]:
    url, handler = media
    project = ls.admin.create_project(f"diff-{random.randrange(10**9)}", CONFIG)
    body = png(np.full((H, W, 3), 120, np.uint8))
    rows = []
    for i in range(n):
        key = f"{project['id']}-{i}"
        handler.files[f"/img/{key}.png"] = ("image/png", body)
        handler.files[f"/ann/{key}.json"] = ("application/json", json.dumps(_objects(i)).encode())
        rows.append({"image": f"{url}/img/{key}.png", "annotation": f"{url}/ann/{key}.json"})
    return project["id"], ls.admin.import_tasks(project["id"], rows)


def _region(result: list[dict[str, Any]], rid: str) -> dict[str, Any]:
    return next(r for r in result if r["id"] == rid)


def _review(kind: str, result: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """A reviewer's change to the prediction's result, and what the diff must count for it (by kind
    and class, `kind:class`)."""
    out = copy.deepcopy(result)
    box = _region(out, "b1")
    label = box["value"]["rectanglelabels"][0]
    if kind == "moved":
        box["value"]["x"] += 10  # 20 px of a 40 px box: IoU 1/3
        return out, Counter({f"moved:{label}": 1})
    if kind == "deleted":
        out.remove(_region(out, "p1"))
        return out, Counter({"deleted:road": 1})
    if kind == "relabelled":
        box["value"]["rectanglelabels"] = ["dog" if label == "cat" else "cat"]
        return out, Counter({f"relabelled:{label}": 1})
    if kind == "added":
        extra = copy.deepcopy(box)
        extra["id"] = "person1"
        extra["value"].update(x=40.0, y=10.0, rectanglelabels=["dog"])  # 160..200 px: clear of both boxes
        out.append(extra)
        return out, Counter({"added:dog": 1})
    if kind == "choice":
        _region(out, "c1")["value"]["choices"] = ["outdoor"]
        return out, Counter({"relabelled:indoor": 1})
    return out, Counter()  # accepted as it is


def test_diff_against_current_counts_what_reviewers_did(label_studio, media, tmp_path, ray_cluster):
    ls = label_studio
    n = 12
    pid, ids = _project(ls, media, n)
    config = LabelStudioConfig(host=ls.url, api_key=ls.personal_token)
    job = {"name": "ls_diff_job", "project": pid, "method": "file", "target_specification_name": "annotation"}
    result = run_to_task(job, platform=config, allowed_hosts=["127.0.0.1"], progress_bar=False,
                         report=tmp_path / "r.jsonl")  # fmt: skip
    assert result.failed_count == 0 and result.ledger, result.message
    tasks = {t["id"]: t for t in ls.admin.list_tasks(pid)}
    expected: Counter[str] = Counter()
    reviews = ("moved", "deleted", "relabelled", "added", "choice", "accepted", "moved", "deleted")
    for kind, tid in zip(reviews, ids, strict=False):
        [pred] = tasks[tid]["predictions"]
        body, counts = _review(kind, pred["result"])
        r = ls.admin.http.post(f"/api/tasks/{tid}/annotations/",
                               json={"result": body, "parent_prediction": pred["id"], "was_cancelled": False})  # fmt: skip
        assert r.status_code == 201, r.text
        expected += counts
    # a skipped task is no review (the prediction is current), and a task whose prediction was
    # deleted holds nothing of the run: it is left out
    skipped, dropped = ids[len(reviews)], ids[len(reviews) + 1]
    r = ls.admin.http.post(f"/api/tasks/{skipped}/annotations/", json={"result": [], "was_cancelled": True})
    assert r.status_code == 201, r.text
    r = ls.admin.http.delete(f"/api/predictions/{tasks[dropped]['predictions'][0]['id']}/")
    assert r.status_code == 204, r.text
    per_task = 5  # objects each task's prediction holds
    counted = n - 1
    edits = sum(expected.values()) - expected["added:dog"]  # an added box is no object of the run's
    env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.personal_token}
    csv_path = tmp_path / "diff.csv"
    out = CliRunner().invoke(
        app, ["diff", result.ledger, "current", "--json", "--csv", str(csv_path)], env=env
    )
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert got["tasks"] == counted
    totals = {k: sum(v for key, v in expected.items() if key.startswith(f"{k}:")) for k in got["totals"]}
    totals["kept"] = counted * per_task - edits
    assert got["totals"] == totals
    for key, v in expected.items():
        kind, cls = key.split(":")
        assert got["by_class"][cls][kind] == v, (key, got["by_class"])
    assert got["edit_rate"] == pytest.approx(sum(expected.values()) / (counted * per_task), abs=1e-6)
    rows = csv_path.read_text().splitlines()
    assert len(rows) == counted + 1 and str(dropped) not in {r.split(",")[0] for r in rows}
    # the other way round: what the reviewers added is what the run deleted
    back = CliRunner().invoke(app, ["diff", "current", result.ledger, "--json"], env=env)
    assert back.exit_code == 0, back.output
    flipped = json.loads(back.stdout)["totals"]
    assert (flipped["deleted"], flipped["added"]) == (totals["added"], totals["deleted"])
