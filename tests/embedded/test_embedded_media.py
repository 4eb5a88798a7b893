"""Media files: signed URLs (valid, expired, tampered, header instead), content types, traversal."""

from __future__ import annotations

import http.client
import os
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from totask_ray.embedded.state import media_signature


def _files(client, demo, k: int = 0) -> dict:
    tid = demo["task_ids"]["first"] + k
    return client.get(f"/tasks/{tid}/", params={"fields": "data_unit", "expand": "data_unit"}).json()[
        "data_unit"
    ]["files"]


def _split(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_signed_urls_serve_the_files_without_credentials(client, platform, demo):
    files = _files(client, demo)
    for spec, ctype in (("annotation_data", "application/json"), ("image_1", None)):
        url = files[spec]["url"]
        r = httpx.get(url)  # no auth header: the signature is enough
        assert r.status_code == 200
        path, q = _split(url)
        assert int(q["expires"]) > time.time() + 3000
        on_disk = (platform.media_dir / path.removeprefix("/media/")).read_bytes()
        assert r.content == on_disk
        if ctype:
            assert r.headers["content-type"] == ctype
        else:
            assert r.headers["content-type"] == ("image/png" if path.endswith(".png") else "image/jpeg")


def test_content_types_of_every_sample_image(platform, demo, client):
    for rel in demo["images"]:
        r = client.get(f"/media/{rel}")  # with the auth header, no signature
        assert r.status_code == 200
        want = "image/png" if rel.endswith(".png") else "image/jpeg"
        assert r.headers["content-type"] == want
        assert r.content[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\xff\xd8\xff\xe1")


def test_expired_tampered_and_missing_signatures_are_403(platform, demo, client):
    url = _files(client, demo, 1)["annotation_data"]["url"]
    path, q = _split(url)
    rel = path.removeprefix("/media/")
    base = f"{platform.url}{path}"
    past = int(time.time()) - 5
    cases = {
        "expired but correctly signed": {
            "expires": past,
            "signature": media_signature(platform.token, rel, past),
        },
        "tampered signature": {
            "expires": q["expires"],
            "signature": q["signature"][:-1] + ("0" if q["signature"][-1] != "0" else "1"),
        },
        "extended expiry": {"expires": int(q["expires"]) + 86400, "signature": q["signature"]},
        "signed with another key": {
            "expires": q["expires"],
            "signature": media_signature("other", rel, int(q["expires"])),
        },
        "no signature": {},
        "signature only": {"signature": q["signature"]},
        "garbage expiry": {"expires": "soon", "signature": q["signature"]},
    }
    for name, params in cases.items():
        r = httpx.get(base, params=params)
        assert r.status_code == 403, name
        assert list(r.json()) == ["detail"], name
        assert b"objects" not in r.content, name
    r = httpx.get(base, params=cases["expired but correctly signed"])
    assert "expired" in r.json()["detail"]
    # another file with this file's signature
    other = _files(client, demo, 2)["annotation_data"]["url"]
    r = httpx.get(f"{platform.url}{_split(other)[0]}", params=q)
    assert r.status_code == 403
    # the token header works instead of a signature, even on an expired link
    r = httpx.get(base, params=cases["expired but correctly signed"], headers=platform.headers)
    assert r.status_code == 200
    r = httpx.get(base, headers={"Authorization": f"Token {platform.token}"})
    assert r.status_code == 200
    r = httpx.get(base, headers={"Authorization": "Token wrong"})
    assert r.status_code == 403


def test_missing_file(platform, client):
    r = client.get("/media/demo/files/nope.json")
    assert r.status_code == 404
    r = httpx.get(f"{platform.url}/media/demo/files/nope.json")
    assert r.status_code == 403  # no credentials: existence is not revealed


@pytest.fixture(scope="module")
def escape_link(platform):
    link = platform.media_dir / "escape_link"
    if not link.exists():
        os.symlink(platform.data_dir, link)
    secret = platform.data_dir / "secret.txt"
    secret.write_text("outside the media dir")
    return link


@pytest.mark.parametrize(
    "raw_path",
    [
        "/media/../platform.db",
        "/media/../secret.txt",
        "/media/demo/../../secret.txt",
        "/media/./demo/images/astronaut.jpg",
        "/media/%2e%2e/secret.txt",
        "/media/%2E%2E/secret.txt",
        "/media/demo/%2e%2e/%2e%2e/secret.txt",
        "/media/..%2fsecret.txt",
        "/media/%2e%2e%2fsecret.txt",
        "/media/..%5csecret.txt",
        "/media//etc/passwd",
        "/media/%2fetc/passwd",
        "/media/demo//images/astronaut.jpg",
        "/media/escape_link/secret.txt",
        "/media/escape_link/platform.db",
        "/media/",
        "/media/demo/images/astronaut.jpg%00.png",
    ],
)
def test_path_traversal_is_404_even_with_the_token(platform, escape_link, raw_path):
    u = urlsplit(platform.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", raw_path, headers=platform.headers)  # sent as is, no normalisation
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 404, (raw_path, resp.status)
    assert b"outside the media dir" not in body and b"SQLite" not in body


def test_a_legit_nested_path_still_works(platform, client, demo):
    r = client.get("/media/demo/images/astronaut.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
