"""`preview` on Label Studio: the faces pre-processor on uploaded images, drawn with the labeling
config's labels, and nothing written: no prediction and no annotation on any task afterwards."""

from __future__ import annotations

import random
import re

import pytest
from helpers import face_jpegs

from totask_ray.platform.label_studio.config import LabelStudioConfig
from totask_ray.preview import preview

pytestmark = pytest.mark.usefixtures("ray_cluster")

FACES_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="faces" toName="image"><Label value="face"/></RectangleLabels>
</View>
"""


def test_preview_writes_nothing_to_label_studio(label_studio, tmp_path):
    from totask_ray.embedded.seeds.faces import FACES_PARAMS
    from totask_ray.embedded.seeds.registry import release_config

    ls = label_studio
    project = ls.admin.create_project(f"faces-preview-{random.randrange(10**9)}", FACES_CONFIG)
    images = face_jpegs(5, seed=3)  # the last has no face
    ids = ls.admin.upload_images(
        project["id"], [(f"f{i}.jpg", body) for i, (body, _, _) in enumerate(images)]
    )
    config = LabelStudioConfig(
        host=ls.url,
        api_key=ls.personal_token,
        model_version="faces-v1",
        releases={7: release_config("faces")},
    )
    params = {"name": "faces_preview", "project": project["id"], "method": "inference", "pre_processor": 7,
              "pre_processor_params": FACES_PARAMS}  # fmt: skip
    page = preview(
        params, platform=config, sample=5, first=True, out=tmp_path / "ls.html", progress_bar=False
    )

    assert ls.admin.predictions(project["id"]) == [], "preview wrote predictions"
    tasks = ls.admin.list_tasks(project["id"])
    assert all(not t.get("annotations") and not t.get("predictions") for t in tasks), (
        "preview wrote to a task"
    )
    assert sorted(page.outcomes) == ids and all(
        o["status"] in ("success", "empty") for o in page.outcomes.values()
    )
    faces = sum(len(truth) for _, truth, _ in images)
    assert page.counts == {"face": faces}
    # the labeling config's label names the class on the page, with its count
    assert re.search(rf'<tr data-class="face">.*?<td class="count">{faces}</td>', page.html, re.S)
    # and the labeling config's control it is written through, by name, beside its labels
    assert re.search(
        r'id="controls">.*?<code>faces</code> \(rectanglelabels on <code>image</code>\): face', page.html
    )
    assert len(re.findall(r'<img class="thumb"', page.html)) == 5
