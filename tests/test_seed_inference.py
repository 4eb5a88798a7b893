"""The inference demos' ground truth holds against the in-process models (no Ray, no server).

The truth is only worth something if the shipped models reproduce it: every face box is found
(IoU >= 0.5) and nothing else, every text is read exactly. The images are read back from the
media dir, as the Serve apps would fetch them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from totask_ray.embedded.seeds import (
    DEMOS,
    FACES_PARAMS,
    OCR_PARAMS,
    iou,
    match_faces,
    release_config,
    seed_faces_demo,
    seed_ocr_demo,
)
from totask_ray.embedded.store import Store
from totask_ray.serving.config import parse_release_config
from totask_ray.serving.params import InferenceParams

FACE_SEEDS = range(5)
FACE_TASKS = 24
OCR_SEEDS = range(2)
OCR_TASKS = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Any:
    s = Store(tmp_path_factory.mktemp("seed-inference") / "platform.db")
    yield s
    s.close()


def _image(store: Store, media_dir: Path, task_id: int) -> np.ndarray:
    files = store.data_unit_files(store.get_task(task_id)["data_unit"])
    assert [f["specification_name"] for f in files] == ["image_1"] and files[0]["is_primary"]
    with Image.open(media_dir / files[0]["path"]) as im:
        assert max(im.size) <= 640
        return np.asarray(im.convert("RGB"))


def test_demos_are_registered():
    assert DEMOS["faces"] is seed_faces_demo and DEMOS["ocr"] is seed_ocr_demo


def test_iou_and_matching():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    m = match_faces([[0, 0, 10, 10], [50, 50, 10, 10]], [[51, 50, 10, 10], [100, 0, 5, 5]])
    assert m["missed"] == [0] and m["extra"] == [1] and m["ious"][1] > 0.8


def test_faces_truth_matches_the_detector(store, tmp_path):
    from serve_apps.faces.app import HaarFaceDetector

    media = tmp_path / "media"
    detector = HaarFaceDetector()
    params = InferenceParams.model_validate(FACES_PARAMS)
    ious: list[float] = []
    problems = []
    first: dict[str, Any] | None = None
    for seed in FACE_SEEDS:
        demo = seed_faces_demo(store, media, tasks=FACE_TASKS, seed=seed)
        first = first or demo
        assert demo["tasks"] == FACE_TASKS and len(demo["truth"]) == FACE_TASKS
        assert demo["counts"]["without_faces"] == FACE_TASKS // 4
        for task_id, truth in demo["truth"].items():
            boxes = [d.bbox for d in detector.detect_one(_image(store, media, task_id), params)]
            found = match_faces(truth, boxes)
            ious += found["ious"]
            if found["missed"] or found["extra"]:
                problems.append((seed, task_id, truth, boxes))
    assert not problems, problems
    assert min(ious) >= 0.5
    print(
        f"\nfaces: {len(ious)} truth faces over {len(FACE_SEEDS) * FACE_TASKS} images, "
        f"IoU min {min(ious):.3f} mean {statistics.mean(ious):.3f}"
    )

    assert first is not None
    assert set(first) >= {
        "project",
        "data_collection",
        "specifications",
        "tasks",
        "task_ids",
        "counts",
        "pre_processor",
        "pre_processor_params",
        "truth",
    }
    assert first["specifications"] == ["image_1"]
    assert list(first["truth"]) == list(range(first["task_ids"]["first"], first["task_ids"]["last"] + 1))
    release = store.get_plugin_release(first["pre_processor"])
    assert (release["plugin"], release["version"]) == ("faces", "1.0.0")
    assert parse_release_config(release["config"]).actions.deployment.entrypoint == (
        "serve_apps.faces.app:build_app"
    )
    # re-seeding reuses the identical release instead of adding another
    assert demo["pre_processor"] == first["pre_processor"]


def test_faces_demo_is_deterministic(tmp_path):
    outs = []
    for run in ("a", "b"):
        with Store(tmp_path / run / "db") as s:
            demo = seed_faces_demo(s, tmp_path / run / "media", tasks=6, seed=11)
            outs.append((list(demo["truth"].values()), demo["counts"]))
    assert outs[0] == outs[1]


def test_ocr_truth_is_read_exactly(store, tmp_path):
    from serve_apps.ocr.app import RapidOCRReader

    media = tmp_path / "media"
    reader = RapidOCRReader()
    params = InferenceParams.model_validate(OCR_PARAMS)
    wrong = []
    n = 0
    for seed in OCR_SEEDS:
        demo = seed_ocr_demo(store, media, tasks=OCR_TASKS, seed=seed)
        assert demo["counts"]["one_line"] + demo["counts"]["two_lines"] == OCR_TASKS
        for task_id, truth in demo["truth"].items():
            got = "\n".join(d.text for d in reader.read_one(_image(store, media, task_id), params))
            n += 1
            if got != truth:
                wrong.append((seed, task_id, truth, got))
    assert not wrong, wrong
    assert n == len(OCR_SEEDS) * OCR_TASKS
    release = store.get_plugin_release(demo["pre_processor"])
    assert release["config"] == release_config("ocr")
    assert all(t and t.strip() == t for t in demo["truth"].values())


def test_seeding_through_the_platform_endpoint(platform):
    import httpx

    r = httpx.post(
        f"{platform.url}/_local/seed/",
        json={"demo": "ocr", "tasks": 3, "seed": 1},
        headers=platform.headers,
        timeout=60,
    )
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["tasks"] == 3 and len(out["truth"]) == 3  # JSON keys: task ids as strings
    task = httpx.get(
        f"{platform.url}/tasks/{out['task_ids']['first']}/",
        params={"expand": "data_unit"},
        headers=platform.headers,
    ).json()
    url = task["data_unit"]["files"]["image_1"]["url"]
    assert httpx.get(url).status_code == 200  # a signed media URL, fetchable without the token
