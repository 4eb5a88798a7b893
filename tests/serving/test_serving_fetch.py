"""A pre-processor's HTTP route fetches images under the same URL policy as the workers' downloads.

One faces app on the session's Ray Serve, allow-listing only 127.0.0.1 and capping images at
MAX_BYTES, asked over real HTTP on loopback to fetch what it must refuse: other loopback hosts, a
private address, redirects to either, non-http schemes, oversize bodies. Every refusal is a 400 whose
message says why and never repeats a signed URL's query. Nothing here reaches beyond loopback:
10.0.0.1 is refused before any connection (the in-process test checks that no socket is opened).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import png
from skimage import data

from totask_ray.net.downloads import DownloadError
from totask_ray.serving.deployment import (
    FetchOptions,
    ImageFetcher,
    client_error,
)
from totask_ray.serving.params import InferenceParams
from totask_ray.serving.resources import DeploymentArgs

APPS = Path(__file__).resolve().parents[2] / "serve_apps"
APP = "faces-fetch-test"
ROUTE = "/faces-fetch-test"
MAX_BYTES = 1024 * 1024
SIG = "expires=9999999999&sig=SECRET-SIGNATURE-0123"


ASTRONAUT = png(data.astronaut())  # ~415 KiB: under MAX_BYTES


class Site:
    """A loopback HTTP server on `host` that records every path it is asked for.

    /astronaut.png (any query), /redirect?to=<url> (302), /big-declared (a Content-Length over the
    cap), /big-streamed (over the cap, no Content-Length), /garbage.png (not an image), else 404.
    """

    def __init__(self, host: str) -> None:
        self.hits: list[str] = []
        self.redirects: dict[str, str] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the socket closes

            def do_GET(self) -> None:
                site.hits.append(self.path)
                path = self.path.split("?", 1)[0]
                if path in site.redirects:
                    self.send_response(302)
                    self.send_header("Location", site.redirects[path])
                    self.end_headers()
                elif path == "/astronaut.png":
                    self._body(ASTRONAUT)
                elif path == "/garbage.png":
                    self._body(b"this is not a PNG at all" * 10)
                elif path == "/big-declared":
                    self._body(b"\0" * (MAX_BYTES + 1))
                elif path == "/big-streamed":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    chunk = b"\0" * 65536
                    for _ in range(MAX_BYTES // len(chunk) + 2):
                        self.wfile.write(chunk)
                else:
                    self.send_error(404)

            def _body(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.host = host
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def redirect(self, name: str, to: str) -> str:
        self.redirects[f"/{name}"] = to
        return self.url(f"/{name}")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site("127.0.0.1")
    yield s
    s.close()


@pytest.fixture(scope="module")
def trap() -> Iterator[Site]:
    """Loopback too, but not allow-listed: it must never see a request."""
    s = Site("127.0.0.2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def route(ray_cluster, serve_http_port) -> Iterator[str]:
    from ray import serve

    from serve_apps.faces.app import build_app

    args = DeploymentArgs(
        ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
        max_batch_size=4,
        options={"allowed_hosts": ["127.0.0.1"], "max_image_bytes": MAX_BYTES, "download_timeout_s": 10},
    )
    serve.run(
        build_app(args.model_dump()),
        name=APP,
        route_prefix=ROUTE,
        logging_config={"enable_access_log": False},
    )
    try:
        yield f"http://127.0.0.1:{serve_http_port}{ROUTE}"
    finally:
        serve.delete(APP)


def _post(route: str, body: Any) -> httpx.Response:
    return httpx.post(route, json=body, timeout=60)


def _refused(route: str, image_path: Any, *needles: str) -> str:
    """POST `image_path`; it must be a 400 with a one-line error naming every needle, no signature."""
    resp = _post(route, {"image_path": image_path, "threshold": 0.5})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert SIG not in error and "SECRET" not in error, error
    assert "\n" not in error and "Traceback" not in error, error
    for needle in needles:
        assert needle in error, error
    return error


# ------------------------------------------------------------------ over HTTP, on Ray Serve


def test_an_allowed_host_is_fetched_and_detected(route, site):
    resp = _post(route, {"image_path": site.url(f"/astronaut.png?{SIG}"), "threshold": 0.5})
    assert resp.status_code == 200, resp.text
    (face,) = resp.json()["objects"]
    assert face["properties"]["label"] == "face" and face["properties"]["confidence"] > 0.9
    # a redirect that stays on the allow-list is followed
    hop = site.redirect("hop", site.url(f"/astronaut.png?{SIG}"))
    assert len(_post(route, {"image_path": hop}).json()["objects"]) == 1


def test_loopback_hosts_that_are_not_allowed_are_refused(route, site, trap):
    _refused(route, trap.url(f"/astronaut.png?{SIG}"), "refusing to fetch from 127.0.0.2", "allow-list")
    # a name that resolves to an allowed address is still another host: checked after DNS
    before = len(site.hits)
    _refused(route, site.url(f"/astronaut.png?{SIG}", host="localhost"), "refusing to fetch from localhost")
    assert trap.hits == [] and len(site.hits) == before


def test_a_private_address_is_refused_before_connecting(route):
    start = time.monotonic()
    _refused(route, f"http://10.0.0.1/x.png?{SIG}", "refusing to fetch from 10.0.0.1", "private")
    # A connection attempt would wait for its 5 s connect timeout (and be retried): none was made.
    assert time.monotonic() - start < 3


def test_a_redirect_off_the_allow_list_is_refused(route, site, trap):
    to_private = site.redirect("to-private", f"http://10.0.0.1/x.png?{SIG}")
    _refused(route, to_private, "refusing to fetch from 10.0.0.1")
    to_loopback = site.redirect("to-loopback", trap.url(f"/astronaut.png?{SIG}"))
    _refused(route, to_loopback, "refusing to fetch from 127.0.0.2")
    to_file = site.redirect("to-file", "file:///etc/passwd")
    _refused(route, to_file, "only http and https")
    assert {"/to-private", "/to-loopback", "/to-file"} <= set(site.hits)
    assert trap.hits == []


def test_other_schemes_and_bad_image_paths_are_refused(route):
    _refused(route, f"file:///etc/passwd?{SIG}", "http:// or https://", "not file://")
    _refused(route, f"ftp://127.0.0.1/x.png?{SIG}", "http:// or https://", "not ftp://")
    _refused(route, 42, "http:// or https://")
    _refused(route, "http:///no-host", "no host")
    resp = _post(route, {"nothing": 1})
    assert resp.status_code == 400 and "image_path" in resp.json()["error"]
    resp = httpx.post(route, content=b"{not json", timeout=30)
    assert resp.status_code == 400 and "not JSON" in resp.json()["error"]


def test_oversize_bodies_are_refused(route, site):
    _refused(route, site.url(f"/big-declared?{SIG}"), "over the 1,048,576-byte limit")
    _refused(route, site.url(f"/big-streamed?{SIG}"), "over the 1,048,576-byte limit")


def test_fetch_and_param_failures_say_why(route, site):
    _refused(route, site.url(f"/missing.png?{SIG}"), "HTTP 404", "127.0.0.1")
    _refused(route, site.url("/garbage.png"), "cannot be decoded")
    resp = _post(route, {"image_path": site.url("/astronaut.png"), "threshold": 3})
    assert resp.status_code == 400 and "invalid param 'threshold'" in resp.json()["error"]
    # the model's own param check: a 400 for this request only, not an error for its batch
    resp = _post(route, {"image_path": site.url(f"/astronaut.png?{SIG}"), "scale_factor": 0.5})
    assert resp.status_code == 400 and "scale_factor" in resp.json()["error"], resp.text
    assert SIG not in resp.text


def test_concurrent_requests_with_different_params_are_answered_separately(route, site):
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [
                {"image_path": site.url("/astronaut.png"), "threshold": 0.5},
                {"image_path": site.url("/astronaut.png"), "threshold": 0.999},
                {"image_path": site.url("/astronaut.png"), "scale_factor": 0.5},
                {"image_path": site.url("/astronaut.png"), "threshold": 0.5},
            ]
            return await asyncio.gather(*(client.post(route, json=b) for b in bodies))

    ok, none, bad, ok2 = asyncio.run(go())
    assert len(ok.json()["objects"]) == 1 and ok2.json() == ok.json()
    assert none.json() == {"objects": []}
    assert bad.status_code == 400 and "scale_factor" in bad.json()["error"]


# ------------------------------------------------------------------ in process, no Ray


def test_fetcher_refuses_private_addresses_without_opening_a_socket(site, monkeypatch):
    opened: list[Any] = []
    real_connect = socket.socket.connect

    def recording(sock: socket.socket, address: Any) -> Any:
        opened.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording)

    async def go() -> None:
        fetcher = ImageFetcher(FetchOptions(allowed_hosts=("127.0.0.1",), max_image_bytes=MAX_BYTES))
        try:
            for url in (
                f"http://10.0.0.1/x.png?{SIG}",
                f"http://[::ffff:10.0.0.1]/x.png?{SIG}",
                f"http://169.254.169.254/latest/meta-data?{SIG}",
            ):
                with pytest.raises(DownloadError, match="refusing to fetch") as info:
                    await fetcher.fetch(url)
                assert SIG not in str(info.value)
            assert opened == []
            image = await fetcher.fetch(site.url(f"/astronaut.png?{SIG}"))
            assert image.shape == (512, 512, 3) and image.dtype == np.uint8
        finally:
            await fetcher.aclose()

    asyncio.run(go())
    assert opened and all(addr[0] == "127.0.0.1" for addr in opened)


def test_allow_private_urls_lets_loopback_through(trap):
    async def go() -> np.ndarray:
        fetcher = ImageFetcher(FetchOptions(allow_private_urls=True))
        try:
            return await fetcher.fetch(trap.url("/astronaut.png"))
        finally:
            await fetcher.aclose()

    assert asyncio.run(go()).shape == (512, 512, 3)
    assert trap.hits == ["/astronaut.png"]
    trap.hits.clear()


def test_fetch_options_split_and_check():
    fetch, rest = FetchOptions.split(
        {"allowed_hosts": ["Files.Example", "[::1]"], "allow_private_urls": False, "min_neighbors": 3}
    )
    assert fetch.allowed_hosts == ("files.example", "::1") and rest == {"min_neighbors": 3}
    assert fetch.policy().host_allowed("files.example") and not fetch.policy().host_allowed("other")
    # host:port trusts that port only
    one_port, _ = FetchOptions.split({"allowed_hosts": ["files.example:9000"]})
    assert one_port.policy().host_allowed("files.example", 9000)
    assert not one_port.policy().host_allowed("files.example", 9001)
    for bad in (["http://files.example"], ["files.example:port"], ["files.example/x"], [""], "files.example"):
        with pytest.raises(ValueError, match="allowed_hosts"):
            FetchOptions.split({"allowed_hosts": bad})
    with pytest.raises(ValueError, match="allow_private_urls"):
        FetchOptions.split({"allow_private_urls": "maybe"})


def test_build_app_rejects_a_bad_allow_list_before_deploying():
    from serve_apps.faces.app import build_app

    with pytest.raises(ValueError, match="allowed_hosts"):
        build_app({"options": {"allowed_hosts": ["https://files.example/"]}})


def test_decode_image_caps_pixels_and_names_the_problem():
    from totask_ray.net.images import ImageDecodeError, decode_image, read_image_size

    assert decode_image(ASTRONAUT).shape == (512, 512, 3)
    assert read_image_size(ASTRONAUT) == (512, 512)
    with pytest.raises(ImageDecodeError, match="is 512x512, over the 100,000-pixel limit") as info:
        decode_image(ASTRONAUT, max_pixels=100_000)
    assert info.value.about("image_path") == "image_path is 512x512, over the 100,000-pixel limit"
    for garbage in (b"GIF89a not really", b""):
        with pytest.raises(ImageDecodeError, match=r"^is not an image: it cannot be decoded$"):
            decode_image(garbage)
        with pytest.raises(ImageDecodeError, match=r"^is not an image: it cannot be decoded$"):
            read_image_size(garbage)


def test_client_error_drops_queries_and_keeps_one_line():
    exc = RuntimeError(f"boom at https://user:pw@files.example/a.png?{SIG} and more\nTraceback (most recent")
    text = client_error(exc)
    assert text == "RuntimeError: boom at https://files.example/a.png and more"
    try:
        InferenceParams.model_validate({"threshold": 3})
    except ValueError as err:
        assert client_error(err).startswith("ValidationError: invalid param 'threshold': Input should be")


def test_the_embedded_runner_allow_lists_its_own_media_host():
    from totask_ray.embedded.ray_runner import PLATFORM_HOST, _release_with_payload
    from totask_ray.serving.config import load_release_config

    config = load_release_config(APPS / "faces").model_dump(mode="json", exclude_none=True)
    config["actions"]["deployment"]["options"] = {"allowed_hosts": ["files.example"]}
    stored = {"id": 1, "plugin": "faces", "version": "1.0.0", "config": config}
    for params in ({}, {"num_cpus": 1, "num_gpus": 0}):
        rel = _release_with_payload(stored, params)
        assert rel.config.actions.deployment.options["allowed_hosts"] == ["files.example", PLATFORM_HOST]
    assert config["actions"]["deployment"]["options"] == {"allowed_hosts": ["files.example"]}
