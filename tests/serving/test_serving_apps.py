"""The two shipped pre-processors on real images: in-process, through a handle, and over HTTP."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import png
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from serve_apps.faces.app import HaarFaceDetector
from serve_apps.ocr.app import RapidOCRReader, bundled_model_paths
from totask_ray.serving.config import PreProcessorRelease, load_release_config
from totask_ray.serving.interface import PreProcessor
from totask_ray.serving.lifecycle import RayServeBackend, ensure_running, teardown
from totask_ray.serving.params import InferenceParams
from totask_ray.serving.validation import validate_output

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["HELLO RAY SERVE", "totask 2025"]


def text_image(lines: list[str] = WORDS) -> np.ndarray:
    img = Image.new("RGB", (640, 110 * len(lines)), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=48)
    for i, line in enumerate(lines):
        draw.text((20, 30 + 100 * i), line, fill="black", font=font)
    return np.asarray(img)


def face_centre_ok(bbox: list[float]) -> bool:
    # The astronaut's face: the cascade finds it at about x 177..270, y 67..160.
    x, y, w, h = bbox
    return 160 < x + w / 2 < 280 and 50 < y + h / 2 < 170 and 60 < w < 160


# ------------------------------------------------------------------ in-process, no Ray


@pytest.fixture(scope="module")
def faces_model() -> HaarFaceDetector:
    return HaarFaceDetector()


@pytest.fixture(scope="module")
def ocr_model() -> RapidOCRReader:
    # Built and used once with RapidOCR's downloader and any non-loopback connect made to fail: the
    # models must come from the wheel.
    import rapidocr.utils.download_file as download_file

    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not host.startswith(("127.", "::1", "localhost", "/")):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(sock, address)

    def no_download(*args, **kwargs):
        raise AssertionError("rapidocr tried to download a model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(download_file.DownloadFile, "run", classmethod(no_download))
        mp.setattr(socket.socket, "connect", loopback_only)
        model = RapidOCRReader()
        model.detect([text_image()], InferenceParams())
    return model


def test_models_implement_the_protocol(faces_model, ocr_model):
    assert isinstance(faces_model, PreProcessor) and isinstance(ocr_model, PreProcessor)
    assert faces_model.spec.labels == {0: "face"} and ocr_model.spec.labels == {0: "text"}


def test_faces_in_process(faces_model):
    images = [data.astronaut(), data.coffee(), data.chelsea()]
    out = faces_model.detect(images, InferenceParams())
    validate_output(images, out, labels=faces_model.spec.labels)
    assert len(out[0]) == 1 and face_centre_ok(list(out[0][0].bbox))
    assert out[0][0].score > 0.9
    assert out[1] == [] and out[2] == []  # coffee cup, cat: no human face
    # params: a threshold above the score removes it; a large image is downscaled and mapped back
    assert faces_model.detect(images[:1], InferenceParams(confidence_threshold=0.999))[0] == []
    big = np.asarray(Image.fromarray(images[0]).resize((1536, 1536)))
    (face,) = faces_model.detect([big], InferenceParams(max_side=512))[0]
    assert face_centre_ok([v / 3 for v in face.bbox])
    with pytest.raises(ValueError, match="scale_factor"):
        faces_model.detect(images[:1], InferenceParams(scale_factor=0.5))


def test_ocr_models_come_from_the_wheel():
    paths = bundled_model_paths()
    assert all(p.is_file() and "site-packages" in str(p) for p in paths.values())


def test_ocr_in_process_reads_exactly(ocr_model):
    images = [text_image(), np.full((80, 120, 3), 255, np.uint8)]
    out = ocr_model.detect(images, InferenceParams())
    validate_output(images, out, labels=ocr_model.spec.labels)
    assert [d.text for d in out[0]] == WORDS
    assert all(d.score > 0.9 and len(d.polygon) == 4 for d in out[0])
    assert out[1] == []
    x, y, w, h = out[0][0].bbox
    assert x < 40 and y < 60 and 300 < w < 460 and 30 < h < 80
    assert [d.text for d in ocr_model.detect(images[:1], InferenceParams(max_objects=1))[0]] in (
        [WORDS[0]],
        [WORDS[1]],
    )


def test_ocr_on_cuda_where_onnxruntime_offers_it():
    import onnxruntime

    from serve_apps.ocr.app import CUDA_EP, cuda_available

    if not cuda_available():
        reason = (
            f"onnxruntime {onnxruntime.__version__} here offers {onnxruntime.get_available_providers()} on "
            f"{onnxruntime.get_device()}, not {CUDA_EP}: install the gpu extra (onnxruntime-gpu) on a GPU host"
        )
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    model = RapidOCRReader(device="cuda")
    assert model.providers()[0] == CUDA_EP, model.providers()
    images = [text_image()]
    out = model.detect(images, InferenceParams.model_validate({"model_config": {"device": "cuda"}}))
    assert [d.text for d in out[0]] == WORDS
    # the same reader still runs on the CPU when a call asks for it
    assert model.providers("cpu") == ["CPUExecutionProvider"]
    cpu = model.detect(images, InferenceParams.model_validate({"model_config": {"device": "cpu"}}))
    assert [d.text for d in cpu[0]] == WORDS


def test_ocr_falls_back_to_cpu_where_cuda_is_not_offered(ocr_model):
    from serve_apps.ocr.app import cuda_available

    if cuda_available():
        pytest.skip("this host offers CUDA; the fallback is for hosts that do not")
    assert ocr_model.resolve_device("cuda") == "cpu" and ocr_model.resolve_device("auto") == "cpu"
    out = ocr_model.detect(
        [text_image()], InferenceParams.model_validate({"model_config": {"device": "cuda"}})
    )
    assert [d.text for d in out[0]] == WORDS
    assert ocr_model.providers("cuda") == ["CPUExecutionProvider"]


def test_app_params_are_checked_by_the_apps_own_models(faces_model, ocr_model):
    with pytest.raises(ValueError, match="param 'max_side'"):
        faces_model.detect([data.astronaut()], InferenceParams(max_side=4))
    with pytest.raises(ValueError, match="param 'text_score'"):
        ocr_model.detect([text_image()], InferenceParams(text_score=1.5))
    with pytest.raises(ValueError, match="scale_factor"):
        HaarFaceDetector(scale_factor=1.0)


# ------------------------------------------------------------------ on Ray Serve (one app per model)


@pytest.fixture(scope="module")
def deployed(ray_cluster, serve_http_port):
    backend = RayServeBackend(delete_timeout_s=30)
    results = []
    try:
        for app in ("faces", "ocr"):
            rel = PreProcessorRelease.from_config(load_release_config(ROOT / "serve_apps" / app))
            # the image server is on loopback: an app fetches from there only when it is allow-listed
            rel.config.actions.deployment.options["allowed_hosts"] = ["127.0.0.1"]
            # an app of the same name left by another module was deployed without this allow-list
            backend.delete(rel.app_name)
            results.append(ensure_running(rel, backend, poll_interval_s=0.1, timeout_s=120))
        yield {r.app_name.split("@")[0]: r for r in results}
    finally:
        for r in results:
            teardown(r, backend)


@pytest.mark.slow
def test_faces_through_a_handle(deployed):
    from ray import serve

    handle = serve.get_app_handle(deployed["faces"].app_name)
    blank = np.full((64, 64, 3), 255, np.uint8)
    images = [data.astronaut(), data.coffee(), *[blank] * 15, data.astronaut()]  # > max_batch_size 16
    out = handle.predict.remote(images, {"confidence_threshold": 0.5}).result(timeout_s=60)
    checked = validate_output(images, out, labels={0: "face"})
    assert len(checked) == 18
    assert all(len(checked[i]) == 1 and face_centre_ok(list(checked[i][0].bbox)) for i in (0, 17))
    assert all(d == [] for d in checked[1:17])


def test_ocr_through_a_handle(deployed):
    from ray import serve

    handle = serve.get_app_handle(deployed["ocr"].app_name)
    images = [text_image(), text_image(["SECOND IMAGE"])]
    out = handle.predict.remote(images, {}).result(timeout_s=60)
    checked = validate_output(images, out, labels={0: "text"})
    assert [d.text for d in checked[0]] == WORDS
    assert [d.text for d in checked[1]] == ["SECOND IMAGE"]


def test_handle_rejects_bad_input(deployed):
    from ray import serve

    handle = serve.get_app_handle(deployed["faces"].app_name)
    with pytest.raises(Exception, match="expected an HxWx3 uint8 RGB array"):
        handle.predict.remote([np.zeros((10, 10), np.uint8)], {}).result(timeout_s=30)


def _post(port: int, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}{route}", json=body, timeout=60)


def test_faces_over_http(deployed, serve_http_port, image_server):
    route = deployed["faces"].route_prefix
    astro = image_server.add("astronaut.png", png(data.astronaut()))
    coffee = image_server.add("coffee.png", png(data.coffee()))
    resp = _post(serve_http_port, route, {"image_path": astro, "threshold": 0.5})
    assert resp.status_code == 200, resp.text
    # task data, as Synapse pre-processors answer: objects with their label and confidence
    (face,) = resp.json()["objects"]
    c = face["coordinates"]
    assert face["type"] == "bbox" and face["properties"]["label"] == "face"
    assert face["properties"]["confidence"] >= 0.5
    assert face_centre_ok([c["x"], c["y"], c["width"], c["height"]])
    assert _post(serve_http_port, route, {"image_path": coffee}).json() == {"objects": []}


def test_ocr_over_http(deployed, serve_http_port, image_server):
    url = image_server.add("words.png", png(text_image()))
    resp = _post(serve_http_port, deployed["ocr"].route_prefix, {"image_path": url})
    assert resp.status_code == 200, resp.text
    assert [o["properties"]["text"] for o in resp.json()["objects"]] == WORDS


def test_http_rejects_bad_requests(deployed, serve_http_port, image_server):
    route = deployed["faces"].route_prefix
    assert _post(serve_http_port, route, {"nothing": 1}).status_code == 400
    resp = _post(serve_http_port, route, {"image_path": "file:///etc/passwd"})
    assert resp.status_code == 400 and "http:// or https://" in resp.json()["error"]
    resp = _post(
        serve_http_port,
        route,
        {"image_path": image_server.add("x.png", png(data.astronaut())), "threshold": 3},
    )
    assert resp.status_code == 400


@pytest.mark.slow
def test_proxy_listens_on_loopback_only(serve_http_port):
    psutil = pytest.importorskip("psutil")
    listeners = [
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == serve_http_port
    ]
    assert listeners and all(ip.startswith("127.") or ip == "::1" for ip in listeners), listeners
