"""totask-ray's own apps under the synapse calling convention, as a Synapse pre-processor is called.

The shared deployment answers `{"image_path": url, ...params}` with task data (`{"objects": [...]}`),
the way the Synapse user guide asks a pre-processor to, and `synapse_route` finds the method a
handle can call with the request body (`infer`; `__call__` takes a starlette request). End to end:
the faces app fetches each task's image itself, one request per task, and the SDK template's hook
writes what it answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import config_for
from helpers import faces_release as create_faces_release
from starlette.requests import Request

from totask_ray import run_to_task
from totask_ray.embedded.seeds import write_sample_images
from totask_ray.serving.config import PreProcessorRelease, load_release_config, parse_release_config
from totask_ray.serving.deployment import ImageRequestError, PreProcessorDeployment
from totask_ray.serving.interface import Detection, PreProcessorSpec

FAST = {"serve_poll_interval_s": 0.5, "serve_ready_timeout_s": 120, "progress_bar": False, "num_actors": 1}
VERSION = "1.0.0+synapse"

# ------------------------------------------------------------------ the route, in process, no Ray


class OneBox:
    """A box on every image whose top-left pixel is white; nothing on the others."""

    spec = PreProcessorSpec(name="one-box", labels={0: "cat"}, devices=("cpu",))

    def detect(self, images: list[np.ndarray], params: Any) -> list[list[Detection]]:
        return [
            [Detection(label="cat", class_id=0, score=0.875, bbox=(1.0, 2.0, 3.0, 4.0))]
            if img[0, 0, 0]
            else []
            for img in images
        ]


def _deployment() -> PreProcessorDeployment:
    dep = PreProcessorDeployment(OneBox, max_batch_size=4)

    async def fetch(url: Any) -> np.ndarray:  # no network: the URL says which image it is
        if url == "http://files/missing.png":
            raise ImageRequestError("image_path is not an image: it cannot be decoded")
        return np.full((8, 8, 3), 255 if "white" in url else 0, np.uint8)

    async def unbatched(item: tuple[np.ndarray, str]) -> Any:  # @serve.batch needs a replica
        return (await dep._infer_grouped([item]))[0]

    dep._fetcher.fetch = fetch  # type: ignore[method-assign]
    dep._http_batch = unbatched
    return dep


def _request(body: bytes) -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


def test_infer_answers_task_data_and_the_http_route_is_the_same_call():
    async def go() -> None:
        dep = _deployment()
        answer = await dep.infer({"image_path": "http://files/white.png", "threshold": 0.5})
        assert answer == {
            "objects": [
                {
                    "id": "obj_001",
                    "class_id": 0,
                    "type": "bbox",
                    "coordinates": {"x": 1.0, "y": 2.0, "width": 3.0, "height": 4.0},
                    "properties": {"label": "cat", "confidence": 0.875},
                }
            ]
        }
        # nothing seen is a result, not a failure
        assert await dep.infer({"image_path": "http://files/black.png"}) == {"objects": []}
        with pytest.raises(ImageRequestError, match="image_path"):
            await dep.infer({"nothing": 1})
        over_http = await dep(_request(json.dumps({"image_path": "http://files/white.png"}).encode()))
        assert over_http == answer
        # the error shape is the route's: {"error": "Type: message"} and the caller's fault is a 400
        for body, needle in [
            (b"{not json", "not JSON"),
            (b'{"nothing": 1}', "image_path"),
            (b'{"image_path": "http://files/missing.png"}', "cannot be decoded"),
            (b'{"image_path": "http://files/white.png", "threshold": 3}', "invalid param 'threshold'"),
        ]:
            resp = await dep(_request(body))
            assert resp.status_code == 400 and needle in json.loads(resp.body)["error"], resp.body

    asyncio.run(go())


def test_synapse_route_calls_infer_on_our_apps_and_the_route_on_a_fastapi_app():
    from totask_ray.methods.inference import synapse_route

    for app in ("faces", "ocr"):
        release = PreProcessorRelease.from_config(load_release_config(f"serve_apps/{app}"))
        assert synapse_route(release) == ("infer", None)
    with open("examples/synapse_preprocessor/config.yaml") as fh:
        sdk = PreProcessorRelease.from_config(parse_release_config(yaml.safe_load(fh)))
    assert synapse_route(sdk) == ("infer:body", None)  # its FastAPI POST / route, by name


# ------------------------------------------------------------------ end to end, on Ray Serve


@pytest.fixture(scope="module")
def images(platform):
    sample = write_sample_images(platform.media_dir)
    return {name: info["path"] for name, info in sample.items()}


@pytest.fixture
def faces_release(platform, ray_cluster, serve_http_port):
    # The app fetches each image itself, from the platform's signed media URLs on loopback: its
    # fetch refuses loopback unless the host is allow-listed.
    yield create_faces_release(
        platform, VERSION, **{"actions.deployment.options": {"allowed_hosts": ["127.0.0.1"]}}
    )
    from ray import serve

    if f"faces@{VERSION}" in serve.status().applications:
        serve.delete(f"faces@{VERSION}")


@pytest.mark.slow
def test_faces_under_the_synapse_convention_end_to_end(platform, images, faces_release):
    store = platform.store
    paths = [images["astronaut"], images["coffee"], *[images["astronaut"]] * 4]
    dc = store.create_data_collection("synapse-convention", [{"name": "image_1", "is_primary": True}])
    project = store.create_project("synapse-convention", dc, ["person", "face"])
    ids = store.create_tasks_bulk(
        project,
        [
            {"data_unit": store.create_data_unit(dc, {"image_1": {"path": p}}), "status": "pending"}
            for p in paths
        ],
    )
    job = {"name": "Faces_Synapse", "project": project, "method": "inference", "pre_processor": faces_release,
           "pre_processor_params": {"confidence_threshold": 0.5}, "batch_size": 8}  # fmt: skip
    result = run_to_task(job, platform=config_for(platform), inference_convention="synapse", **FAST)

    assert (result.success_count, result.failed_count, result.empty_count) == (len(ids), 0, 1)
    assert store.get_task(ids[1])["data"] == {"objects": []}  # the coffee cup: no face, written as such
    for tid in ids[:1] + ids[2:]:
        (face,) = store.get_task(tid)["data"]["objects"]
        c = face["coordinates"]
        assert face["type"] == "bbox" and face["properties"]["label"] == "face"
        assert face["class_id"] == 2  # the model's label mapped to the project's class
        assert 0.5 <= face["properties"]["confidence"] <= 1.0
        assert 177 <= c["x"] + c["width"] / 2 <= 270 and 67 <= c["y"] + c["height"] / 2 <= 160
