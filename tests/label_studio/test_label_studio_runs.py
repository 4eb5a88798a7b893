"""Both methods against a real Label Studio server (tests/label_studio/conftest.py starts it).

Every outcome is read back from Label Studio itself: the predictions (or annotations) on each task,
their labels, coordinates (percentages of the image, within 1 %), scores and `model_version`; a
re-run is checked to write nothing. The faults are real too: a bad token, a project that does not
exist, a task deleted while the run is under way, a model label the labeling config lacks.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import numpy as np
import pytest
from helpers import face_jpegs, png

from totask_ray import ToTask, run_to_task
from totask_ray.errors import ToTaskError
from totask_ray.platform.label_studio.config import LabelStudioConfig

pytestmark = pytest.mark.usefixtures("ray_cluster")

SHAPES_CONFIG = """
<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <PolygonLabels name="poly" toName="img"><Label value="road"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="img"><Label value="eye"/></KeyPointLabels>
  <Choices name="scene" toName="img"><Choice value="indoor"/><Choice value="outdoor"/></Choices>
</View>
"""
FACES_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="faces" toName="image"><Label value="face"/></RectangleLabels>
</View>
"""


def _png(width: int, height: int) -> bytes:
    return png(np.full((height, width, 3), (90, 120, 150), np.uint8))


def _objects(i: int) -> dict[str, Any]:
    """One annotation file in the task-data object model (pixels) with every shape the config takes."""
    return {
        "objects": [
            {
                "id": "b1",
                "class_id": i % 2,  # cat or dog, by class id only (ids follow the config's label order)
                "type": "bbox",
                "coordinates": {"x": 10 + i, "y": 20, "width": 50, "height": 30},
                "properties": {"confidence": 0.5 + i / 100},
            },
            {
                "id": "p1",
                "class_id": 2,
                "type": "polygon",
                "coordinates": {"points": [[0, 0], [100, 0], [100, 50]]},
                "properties": {"label": "road", "confidence": 0.7},
            },
            {
                "id": "k1",
                "class_id": 3,
                "type": "keypoint",
                "coordinates": {"points": [[40, 25]]},
                "properties": {"label": "eye"},
            },
            {"id": "c1", "class_id": 4, "type": "classification", "properties": {"label": "outdoor"}},
        ]
    }


def _config(ls: Any, token: str | None = None, **kw: Any) -> LabelStudioConfig:
    return LabelStudioConfig(host=ls.url, api_key=token or ls.personal_token, **kw)


def _shapes_project(ls: Any, media: tuple[str, Any], n: int) -> tuple[int, list[int]]:
    url, handler = media
    project = ls.admin.create_project(f"shapes-{random.randrange(10**9)}", SHAPES_CONFIG)
    rows = []
    for i in range(n):
        key = f"{project['id']}-{i}"
        handler.files[f"/img/{key}.png"] = ("image/png", _png(200, 100))
        handler.files[f"/ann/{key}.json"] = ("application/json", json.dumps(_objects(i)).encode())
        rows.append({"image": f"{url}/img/{key}.png", "annotation": f"{url}/ann/{key}.json"})
    ids = ls.admin.import_tasks(project["id"], rows)
    return project["id"], ids


def _params(project: int, **kw: Any) -> dict[str, Any]:
    return {"name": kw.pop("name", "ls_file_job"), "project": project, "method": "file",
            "target_specification_name": "annotation", **kw}  # fmt: skip


def _run(params: dict[str, Any], config: LabelStudioConfig, **kw: Any) -> Any:
    return run_to_task(params, platform=config, allowed_hosts=["127.0.0.1"], progress_bar=False, **kw)


def _by_task(predictions: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for p in predictions:
        out.setdefault(p["task"], []).append(p)
    return out


def test_file_method_writes_predictions_then_a_rerun_writes_nothing(label_studio, media):
    ls = label_studio
    pid, ids = _shapes_project(ls, media, 12)
    media[1].auth_seen.clear()
    result = _run(_params(pid), _config(ls))
    assert result.success_count == 12 and result.failed_count == 0, result.message

    written = _by_task(ls.admin.predictions(pid))
    assert sorted(written) == sorted(ids)
    for n, tid in enumerate(sorted(ids)):
        [pred] = written[tid]
        assert pred["model_version"] == "ls_file_job"  # the job's name by default
        got = {(r["from_name"], r["id"]): r for r in pred["result"]}
        box = got[("box", "b1")]
        assert box["value"]["rectanglelabels"] == ["cat" if n % 2 == 0 else "dog"]
        assert box["value"]["x"] == pytest.approx((10 + n) / 200 * 100, abs=1)
        assert box["value"]["y"] == pytest.approx(20.0, abs=1)
        assert box["value"]["width"] == pytest.approx(25.0, abs=1)
        assert box["value"]["height"] == pytest.approx(30.0, abs=1)
        assert box["score"] == pytest.approx(0.5 + n / 100)
        assert (box["original_width"], box["original_height"]) == (200, 100)
        poly = got[("poly", "p1")]
        assert poly["value"]["polygonlabels"] == ["road"]
        assert poly["value"]["points"] == [[0, 0], [50, 0], [50, 50]]
        assert got[("kp", "k1")]["value"]["keypointlabels"] == ["eye"]
        assert got[("kp", "k1")]["value"]["x"] == pytest.approx(20.0, abs=1)
        assert got[("scene", "c1")]["value"]["choices"] == ["outdoor"]
        assert pred["score"] == pytest.approx((0.5 + n / 100 + 0.7) / 2, abs=1e-6)
    # the token went to Label Studio only, never to the host that serves the files
    assert media[1].auth_seen and not any(media[1].auth_seen)

    again = _run(_params(pid), _config(ls))
    assert (again.success_count, again.skipped_count, again.failed_count) == (0, 12, 0), again.message
    assert len(ls.admin.predictions(pid)) == 12  # nothing written twice


def test_filters_limit_and_legacy_key(label_studio, media):
    ls = label_studio
    pid, ids = _shapes_project(ls, media, 6)
    lowest = sorted(ids)[:2]
    first = _run(_params(pid, task_filters={"id__in": lowest}), _config(ls, ls.legacy_token))
    assert first.success_count == 2, first.message
    # "no predictions yet" and a limit: the next three in id order, none of the first two
    second = _run(
        _params(pid, name="second", task_filters={"has_predictions": False, "limit": 3}),
        _config(ls, ls.legacy_token),
    )
    assert second.success_count == 3 and second.total_tasks == 3, second.message
    written = _by_task(ls.admin.predictions(pid))
    assert sorted(written) == sorted(ids)[:5]
    assert {p["model_version"] for t in sorted(ids)[2:5] for p in written[t]} == {"second"}


def test_a_filter_label_studio_cannot_apply_is_refused(label_studio, media):
    ls = label_studio
    pid, _ = _shapes_project(ls, media, 2)
    with pytest.raises(ToTaskError) as err:
        _run(_params(pid, task_filters={"status": "pending"}), _config(ls))
    assert "cannot filter tasks by 'status'" in str(err.value) and "has_predictions" in str(err.value)
    assert ls.admin.predictions(pid) == []


def test_annotations_on_request(label_studio, media):
    ls = label_studio
    pid, ids = _shapes_project(ls, media, 3)
    config = _config(ls, write="annotations")
    result = _run(_params(pid), config)
    assert result.success_count == 3, result.message
    tasks = {t["id"]: t for t in ls.admin.list_tasks(pid)}
    for tid in ids:
        [ann] = tasks[tid]["annotations"]
        assert {r["from_name"] for r in ann["result"]} == {"box", "poly", "kp", "scene"}
    assert ls.admin.predictions(pid) == []
    again = _run(_params(pid), config)
    assert again.skipped_count == 3 and again.success_count == 0


class DeletesOneTask(ToTask):
    """Deletes task `victim` on Label Studio while the run converts it: a task gone mid-run."""

    victim: int = 0
    where: tuple[str, str] = ("", "")  # the server's URL and a key (plain strings: the class is pickled)

    def convert_data_from_file(self, primary_url, primary_name, data_url, data_name, task_data):
        if task_data["id"] == type(self).victim:
            import httpx

            url, key = type(self).where
            httpx.delete(f"{url}/api/tasks/{self.victim}/", headers={"Authorization": f"Token {key}"})
        return _objects(0)


def test_a_task_deleted_mid_run_fails_alone(label_studio, media):
    ls = label_studio
    pid, ids = _shapes_project(ls, media, 8)
    DeletesOneTask.victim, DeletesOneTask.where = sorted(ids)[3], (ls.url, ls.legacy_token)
    result = _run(_params(pid), _config(ls), action_cls=DeletesOneTask)
    assert (result.success_count, result.failed_count) == (7, 1), result.message
    [failure] = result.failures
    assert failure.task_id == DeletesOneTask.victim
    assert "no longer in project" in failure.error
    assert sorted(_by_task(ls.admin.predictions(pid))) == sorted(set(ids) - {DeletesOneTask.victim})


def test_bad_token_and_unknown_project_fail_fast_without_the_token(label_studio, media):
    ls = label_studio
    pid, _ = _shapes_project(ls, media, 1)
    bad = "0123456789abcdef0123456789abcdef01234567"
    t0 = time.monotonic()
    with pytest.raises(ToTaskError) as err:
        _run(_params(pid), _config(ls, bad))
    assert time.monotonic() - t0 < 15
    assert "401" in str(err.value) and bad not in str(err.value)
    # it says what to set, and which kind of token Label Studio takes
    assert "check LABEL_STUDIO_API_KEY (or --token): Label Studio takes a Personal Access Token" in str(
        err.value
    )
    with pytest.raises(ToTaskError) as err:
        _run(_params(987654), _config(ls))
    assert "Project not found" in str(err.value)
    assert ls.personal_token not in str(err.value)


def test_inference_on_uploaded_images(label_studio):
    """Images uploaded to Label Studio (`/data/upload/...`, fetched with the token) through the faces
    pre-processor; each face found where it was pasted, the face-free image given an empty result."""
    from totask_ray.embedded.seeds.faces import FACES_PARAMS, iou
    from totask_ray.embedded.seeds.registry import release_config

    ls = label_studio
    project = ls.admin.create_project(f"faces-{random.randrange(10**9)}", FACES_CONFIG)
    images = face_jpegs(5, seed=3)
    ids = ls.admin.upload_images(
        project["id"], [(f"f{i}.jpg", body) for i, (body, _, _) in enumerate(images)]
    )
    assert len(ids) == 5
    tasks = {t["id"]: t for t in ls.admin.list_tasks(project["id"])}
    assert all(tasks[t]["data"]["image"].startswith("/data/upload/") for t in ids)
    params = {"name": "faces_job", "project": project["id"], "method": "inference", "pre_processor": 7,
              "pre_processor_params": FACES_PARAMS}  # fmt: skip
    config = _config(ls, model_version="faces-v1", releases={7: release_config("faces")})
    result = _run(params, config)
    assert result.failed_count == 0 and result.success_count == 5, result.message

    written = _by_task(ls.admin.predictions(project["id"]))
    # the upload names the files in order; match each task to its image by its name
    by_name = {tasks[t]["data"]["image"].rsplit("-", 1)[-1]: t for t in ids}
    for i, (_, truth, (w, h)) in enumerate(images):
        [pred] = written[by_name[f"f{i}.jpg"]]
        assert pred["model_version"] == "faces-v1"
        boxes = [
            [r["value"]["x"] * w / 100, r["value"]["y"] * h / 100, r["value"]["width"] * w / 100,
             r["value"]["height"] * h / 100]
            for r in pred["result"]
        ]  # fmt: skip
        assert len(boxes) == len(truth)
        for t in truth:
            assert max(iou(t, b) for b in boxes) >= 0.5
        for r in pred["result"]:
            assert r["value"]["rectanglelabels"] == ["face"] and 0 < r["score"] <= 1
    again = _run(params, config)
    assert again.skipped_count == 5 and again.success_count == 0


def test_a_model_label_missing_from_the_config_is_refused_at_prepare(label_studio):
    from ray import serve

    from totask_ray.embedded.seeds.registry import release_config

    ls = label_studio
    project = ls.admin.create_project(
        f"nofaces-{random.randrange(10**9)}", FACES_CONFIG.replace('value="face"', 'value="person"')
    )
    ls.admin.upload_images(project["id"], [("a.jpg", face_jpegs(1, seed=1)[0][0])])
    params = {"name": "faces_job", "project": project["id"], "method": "inference", "pre_processor": 7}
    version = "9.9.9-unmapped"
    with pytest.raises(ToTaskError) as err:
        _run(params, _config(ls, releases={7: {**release_config("faces"), "version": version}}))
    assert "'face'" in str(err.value) and "'person'" in str(err.value)
    assert ls.admin.predictions(project["id"]) == []
    assert f"faces@{version}" not in serve.status().applications  # refused before it was deployed


def test_the_access_token_is_renewed_before_it_expires_and_after_a_401(label_studio, media):
    import asyncio

    from totask_ray.platform.label_studio.client import AsyncLabelStudioClient, LabelStudioClient

    ls = label_studio
    pid, ids = _shapes_project(ls, media, 1)

    async def go() -> None:
        client = AsyncLabelStudioClient(_config(ls))
        try:
            await client.get_task(ids[0])
            first = client._core.headers["Authorization"]
            assert first.startswith("Bearer ") and ls.personal_token not in first
            client._auth._expires = time.time() + 5  # inside the renewal margin: the next call renews first
            await client.get_task(ids[0])
            second = client._core.headers["Authorization"]
            assert second != first
            client._core.set_headers({**client._core.headers, "Authorization": "Bearer revoked"})
            client._auth._expires = time.time() + 3600  # looks fresh, but the server refuses it: renewed once
            trades = []
            use = client._auth.use
            client._auth.use = lambda access: (trades.append(access), use(access))  # counts the trades
            got = await asyncio.gather(*(client.get_task(ids[0]) for _ in range(8)))
            assert {t.id for t in got} == {ids[0]}
            assert client._core.headers["Authorization"] not in (first, second, "Bearer revoked")
            assert len(trades) == 1, f"8 calls refused at once traded the token {len(trades)} times, not once"
        finally:
            await client.aclose()

    asyncio.run(go())
    with LabelStudioClient(_config(ls)) as blocking:
        assert blocking.get_project(pid).classes[0].name == "cat"


def test_a_prediction_label_studio_drops_silently_fails_alone(label_studio, media):
    """The bulk import drops a result that does not fit the labeling config and says only
    `created: N-1`: the writer reads the tasks back and fails just the one it dropped."""
    import asyncio

    from totask_ray.platform.label_studio.client import AsyncLabelStudioClient

    ls = label_studio
    pid, ids = _shapes_project(ls, media, 3)
    good = [{"from_name": "box", "to_name": "img", "type": "rectanglelabels",
             "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["cat"]}}]  # fmt: skip
    bad = [{**good[0], "from_name": "no_such_control"}]

    async def go() -> list[Any]:
        client = AsyncLabelStudioClient(_config(ls, model_version="drop-check"))
        try:
            items = [
                {"task": t, "result": bad if t == ids[1] else good, "model_version": "drop-check"}
                for t in ids
            ]
            return await asyncio.gather(*(client._writer.put(pid, i) for i in items), return_exceptions=True)
        finally:
            await client.aclose()

    outcomes = dict(zip(ids, asyncio.run(go()), strict=True))
    assert "did not store the prediction" in str(outcomes[ids[1]])
    assert sorted(_by_task(ls.admin.predictions(pid))) == [ids[0], ids[2]]
    # a stored prediction answers what it created (the run ledger's record, for `totask-ray undo`)
    stored = {p["task"]: p["id"] for p in ls.admin.predictions(pid)}
    assert [outcomes[t]["id"] for t in (ids[0], ids[2])] == [stored[ids[0]], stored[ids[2]]]


def test_the_cli_finds_label_studio_in_the_environment(label_studio, media, tmp_path):
    """`totask-ray run job.yaml` with LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY set and no SYNAPSE_HOST:
    the same job file, an LS project id, predictions visible in Label Studio; the key never printed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ray
    import yaml

    ls = label_studio
    pid, ids = _shapes_project(ls, media, 3)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_params(pid, name="cli_job")))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SYNAPSE_", "LABEL_STUDIO_"))
    }
    env.update(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.personal_token, RAY_USAGE_STATS_ENABLED="0")
    exe = Path(sys.executable).with_name("totask-ray")
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [str(exe), "run", str(job), "--allow-host", "127.0.0.1", "--address", address],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert ls.personal_token not in out.stdout + out.stderr
    preds = ls.admin.predictions(pid)
    assert sorted(p["task"] for p in preds) == sorted(ids)
    assert {p["model_version"] for p in preds} == {"cli_job"}


@pytest.mark.parametrize(
    ("filters", "words"),
    [
        ({"status__in": ["pending"]}, "cannot filter tasks by 'status__in'"),
        ({"id__gt": 10**9}, "No tasks found matching filters"),
    ],
    ids=["a Synapse filter", "nothing to do"],
)
def test_inference_refusals_come_before_the_model_starts(label_studio, filters, words):
    """README's Synapse filter on Label Studio, or no task to do: refused at prepare, and the
    pre-processor was never deployed (not started and torn down)."""
    from ray import serve

    from totask_ray.embedded.seeds.faces import FACES_PARAMS
    from totask_ray.embedded.seeds.registry import release_config

    ls = label_studio
    project = ls.admin.create_project(f"refused-{random.randrange(10**9)}", FACES_CONFIG)
    ls.admin.upload_images(project["id"], [("a.jpg", face_jpegs(1, seed=2)[0][0])])
    before = set(serve.status().applications)
    params = {"name": "refused", "project": project["id"], "method": "inference", "pre_processor": 7,
              "pre_processor_params": FACES_PARAMS, "task_filters": filters}  # fmt: skip
    config = _config(ls, releases={7: {**release_config("faces"), "version": "9.9.9-refused"}})
    with pytest.raises(ToTaskError) as err:
        _run(params, config)
    assert words in str(err.value)
    assert set(serve.status().applications) == before
    assert not any(name.startswith("faces@9.9.9") for name in serve.status().applications)
    assert ls.admin.predictions(project["id"]) == []


def test_annotations_mode_counts_a_skipped_annotation_as_no_annotation(label_studio, media):
    """A person skipped task A (LS keeps an annotation with `was_cancelled`) and annotated task B: a
    run that writes annotations writes A and C (none) and leaves B, as the skip holds no labels."""
    ls = label_studio
    pid, ids = _shapes_project(ls, media, 3)
    skipped, annotated, empty = sorted(ids)
    http = ls.admin.http
    http.post(
        f"/api/tasks/{skipped}/annotations/", json={"result": [], "was_cancelled": True}
    ).raise_for_status()
    human = [{"from_name": "scene", "to_name": "img", "type": "choices", "value": {"choices": ["indoor"]}}]
    http.post(f"/api/tasks/{annotated}/annotations/", json={"result": human}).raise_for_status()
    result = _run(_params(pid), _config(ls, write="annotations"))
    assert (result.success_count, result.skipped_count) == (2, 1), result.message
    tasks = {t["id"]: t for t in ls.admin.list_tasks(pid)}
    written = {
        tid
        for tid, t in tasks.items()
        if any(a.get("result") and a["result"] != human for a in t["annotations"])
    }
    assert written == {skipped, empty}, {tid: t["annotations"] for tid, t in tasks.items()}
    assert [a["result"] for a in tasks[annotated]["annotations"]] == [human]
