"""Security: which file URLs may be fetched, byte caps, the embedded platform's exposure, and the
token appearing nowhere after the failure scenarios of tests/test_bad_input.py.

Every "refused" case here is refused before a connection is attempted: unit tests use a recording
transport (no socket at all) or hostnames that resolve to loopback; nothing contacts any address but
127.0.0.1.

Covered elsewhere, not repeated: the token on every endpoint but health
(tests/embedded/test_embedded_auth.py::test_401_without_a_valid_token_and_nothing_leaks) and path
traversal out of the media dir (tests/embedded/test_embedded_media.py::
test_path_traversal_is_404_even_with_the_token, test_expired_tampered_and_missing_signatures_are_403).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import BIN, cli_env, file_server, read_report
from test_bad_input import NEVER, SIG, RecordingRoutes, bad_input_project

import totask_ray.net.downloads as downloads
from totask_ray.net.downloads import Downloader, DownloadError, UrlPolicy, fetch_json_sync

PLATFORM = "http://127.0.0.1:8000"  # the platform's own host: always allowed
GOOD = b'{"objects": []}'


# -- the URL policy ----------------------------------------------------------------------------------

REFUSED_ADDRESSES = [
    "127.0.0.1", "127.255.255.254", "::1",  # loopback
    "10.255.255.1", "172.16.0.1", "192.168.1.1", "fc00::1", "fd12:3456::1",  # private
    "169.254.169.254", "fe80::1", "fe80::1%eth0",  # link-local (cloud metadata)
    "100.64.0.1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "192.0.2.1",  # other non-public
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",  # IPv4-mapped
    "::127.0.0.1", "2002:7f00:1::", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1",  # embedded IPv4
]  # fmt: skip
PUBLIC_ADDRESSES = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_non_public_addresses_are_refused_unless_trusted(address):
    with pytest.raises(
        DownloadError, match=r"refusing to fetch from files\.example: it resolves to a private"
    ):
        UrlPolicy.for_platform(PLATFORM).check_addresses("files.example", [address])
    # one bad address among good ones is enough to refuse
    with pytest.raises(DownloadError):
        UrlPolicy().check_addresses("files.example", ["93.184.216.34", address])
    # trusted: the platform's own host, an allow-list entry (a host on every port, or host:port only
    # on that port), or private URLs allowed outright
    platform_at = UrlPolicy.for_platform("http://files.example:9000/api")
    platform_at.check_addresses("files.example", [address], 9000)
    with pytest.raises(DownloadError, match=r"--allow-host files\.example:9001 "):  # its origin only
        platform_at.check_addresses("files.example", [address], 9001)
    UrlPolicy.for_platform(PLATFORM, ["FILES.example"]).check_addresses("files.example", [address], 1234)
    one_port = UrlPolicy.for_platform(PLATFORM, ["files.example:9000"])
    one_port.check_addresses("files.example", [address], 9000)
    with pytest.raises(
        DownloadError,
        match=r"add it to the allow-list: --allow-host files\.example:9001 \(allowed_hosts in Python",
    ):
        one_port.check_addresses("files.example", [address], 9001)
    UrlPolicy(allow_private=True).check_addresses("files.example", [address])


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(address):
    UrlPolicy().check_addresses("files.example", [address])


class Recorder:
    """A transport that records every request and answers from `routes` (path -> Response)."""

    def __init__(self, routes: dict[str, httpx.Response] | None = None):
        self.routes = routes or {}
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(str(request.url))
        return self.routes.get(request.url.path, httpx.Response(404))


def _fetch(dl: Downloader, url: str, **kw) -> object:
    async def go():
        try:
            return await dl.fetch_json(url, **kw)
        finally:
            await dl.aclose()

    return asyncio.run(go())


REFUSED_URLS = [
    ("http://169.254.169.254/latest/meta-data/", "refusing to fetch from 169.254.169.254"),
    ("http://10.255.255.1/x.json", "refusing to fetch from 10.255.255.1"),
    ("http://192.168.1.1/x.json", "refusing to fetch from 192.168.1.1"),
    ("http://[::1]:8000/x.json", "refusing to fetch from ::1"),
    ("http://[fe80::1]/x.json", "refusing to fetch from fe80::1"),
    ("http://[::ffff:a9fe:a9fe]/latest/meta-data/", "refusing to fetch from ::ffff:a9fe:a9fe"),
    ("http://localhost:8000/x.json", "refusing to fetch from localhost"),
    ("http://LOCALHOST:8000/x.json", "refusing to fetch from localhost"),
    ("http://127.0.0.2:8000/x.json", "refusing to fetch from 127.0.0.2"),
    ("http://2130706433:8000/x.json", "refusing to fetch from 2130706433"),  # 127.0.0.1 as one number
    ("http://0:8000/x.json", "refusing to fetch from 0"),
    ("file:///etc/passwd", "only http and https file URLs are allowed, not file://"),
    ("ftp://127.0.0.1/x.json", "only http and https file URLs are allowed, not ftp://"),
    ("gopher://127.0.0.1:8000/_x", "only http and https file URLs are allowed, not gopher://"),
    ("//127.0.0.1:8000/x.json", "only http and https file URLs are allowed, not (none)://"),
    ("http:///x.json", "the file URL has no host"),
    ("http://127.0.0.1:99999/x.json", "the file URL is malformed"),
]


@pytest.mark.parametrize(("url", "words"), REFUSED_URLS, ids=[u for u, _ in REFUSED_URLS])
def test_refused_before_any_request_is_made(url, words):
    rec = Recorder()
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as info:
        _fetch(Downloader(UrlPolicy.for_platform(PLATFORM), transport=httpx.MockTransport(rec)), url)
    assert words in str(info.value)
    assert rec.seen == []  # no request: refused before any connection
    assert time.monotonic() - t0 < 2  # refused at once, not after a connect timeout


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("http://169.254.169.254/latest/meta-data/", "refusing to fetch from 169.254.169.254"),
        (
            "http://[::ffff:169.254.169.254]/latest/meta-data/",
            "refusing to fetch from ::ffff:169.254.169.254",
        ),
        ("http://10.255.255.1/admin", "refusing to fetch from 10.255.255.1"),
        ("http://localhost:8000/x.json", "refusing to fetch from localhost"),
        ("file:///etc/passwd", "not file://"),
        ("/hop2", "refusing to fetch from localhost"),  # a second hop, relative, then a bad third
    ],
)
def test_every_redirect_hop_is_checked(location, words):
    rec = Recorder(
        {
            "/start": httpx.Response(302, headers={"Location": location}),
            "/hop2": httpx.Response(
                307, headers={"Location": "http://localhost:8000/x.json?signature=" + SIG}
            ),
        }
    )
    with pytest.raises(DownloadError) as info:
        _fetch(
            Downloader(UrlPolicy.for_platform(PLATFORM), transport=httpx.MockTransport(rec)),
            f"{PLATFORM}/start",
        )
    assert words in str(info.value) and SIG not in str(info.value)
    assert all(u.startswith(PLATFORM) for u in rec.seen), rec.seen  # only the allowed host was asked


def test_a_redirect_chain_within_allowed_hosts_is_followed():
    rec = Recorder(
        {
            "/a": httpx.Response(301, headers={"Location": "/b"}),
            "/b": httpx.Response(302, headers={"Location": "http://localhost/c.json"}),
            "/c.json": httpx.Response(200, content=GOOD, headers={"content-type": "application/json"}),
        }
    )
    policy = UrlPolicy.for_platform(PLATFORM, ["localhost"])  # allow-listed, though it is loopback
    assert _fetch(Downloader(policy, transport=httpx.MockTransport(rec)), f"{PLATFORM}/a") == {"objects": []}
    assert [httpx.URL(u).path for u in rec.seen] == ["/a", "/b", "/c.json"]


def test_dns_rebinding_is_refused_at_connect_time(monkeypatch):
    """The name passes the first check (it "resolves" to a public address), then resolves to
    loopback when the connection is made: the connection's own resolver applies the policy again."""

    async def public(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]  # only fed to the first check; nothing connects to it

    routes = RecordingRoutes({"/ok.json": (200, "application/json", GOOD, {})})
    with file_server(routes) as base:
        port = base.rsplit(":", 1)[1]
        monkeypatch.setattr(downloads, "_resolve", public)
        with pytest.raises(DownloadError, match="refusing to fetch from localhost"):
            _fetch(Downloader(UrlPolicy.for_platform(PLATFORM)), f"http://localhost:{port}/ok.json")
        assert routes.requested == []
        # the same name on the allow-list is fetched
        allowed = UrlPolicy.for_platform(PLATFORM, ["localhost"])
        assert _fetch(Downloader(allowed), f"http://localhost:{port}/ok.json") == {"objects": []}
        assert routes.requested == ["/ok.json"]


def test_allow_list_and_allow_private_let_trusted_loopback_hosts_through():
    routes = RecordingRoutes({"/ok.json": (200, "application/json", GOOD, {})})
    with file_server(routes) as base:
        url = f"http://localhost:{base.rsplit(':', 1)[1]}/ok.json"
        with pytest.raises(DownloadError, match="refusing"):
            _fetch(Downloader(UrlPolicy.for_platform(PLATFORM)), url)
        assert _fetch(Downloader(UrlPolicy.for_platform(PLATFORM, ["localhost"])), url) == {"objects": []}
        assert _fetch(Downloader(UrlPolicy(allow_private=True)), url) == {"objects": []}
        # the platform's own host is matched by name: 127.0.0.1 is the platform here
        assert _fetch(Downloader(UrlPolicy.for_platform(base)), f"{base}/ok.json") == {"objects": []}
        # the blocking path that plugin hooks reach through super() applies the same policy
        with pytest.raises(DownloadError, match="refusing to fetch from localhost"):
            fetch_json_sync(url, UrlPolicy.for_platform(base))
        with pytest.raises(DownloadError, match="not file://"):
            fetch_json_sync("file:///etc/passwd", UrlPolicy.for_platform(base))
        assert fetch_json_sync(f"{base}/ok.json", UrlPolicy.for_platform(base)) == {"objects": []}
    assert routes.requested == ["/ok.json"] * 4


def test_an_allow_list_entry_with_a_port_trusts_that_port_only():
    """`--allow-host 127.0.0.1:PORT`: the file server on that port is fetched (both fetch paths), the
    same host on another port is refused with the entry to add, and the run's log says who is trusted."""
    routes = RecordingRoutes({"/ok.json": (200, "application/json", GOOD, {})})
    with file_server(routes) as base:
        port = int(base.rsplit(":", 1)[1])
        policy = UrlPolicy.for_platform("http://localhost:8080", [f"127.0.0.1:{port}"])
        assert _fetch(Downloader(policy), f"{base}/ok.json") == {"objects": []}
        assert fetch_json_sync(f"{base}/ok.json", policy) == {"objects": []}
        other = UrlPolicy.for_platform("http://localhost:8080", [f"127.0.0.1:{port + 1}"])
        with pytest.raises(
            DownloadError, match=rf"add it to the allow-list: --allow-host 127\.0\.0\.1:{port} "
        ):
            _fetch(Downloader(other), f"{base}/ok.json")
        with pytest.raises(DownloadError, match=r"--allow-host 127\.0\.0\.1"):
            fetch_json_sync(f"{base}/ok.json", other)
    assert routes.requested == ["/ok.json"] * 2
    assert (
        policy.describe()
        == f"private file hosts trusted: localhost:8080 (the platform itself), 127.0.0.1:{port} (--allow-host)"
    )


@pytest.mark.parametrize(
    ("value", "entry"),
    [("Files.Example", "files.example"), ("127.0.0.1:18081", "127.0.0.1:18081"), ("[::1]:9000", "[::1]:9000"),
     ("::1", "::1"), (" localhost ", "localhost")],
)  # fmt: skip
def test_allow_host_takes_host_or_host_port(value, entry):
    from totask_ray import RunOptions

    assert RunOptions(allowed_hosts=[value]).allowed_hosts == [entry]


@pytest.mark.parametrize(
    "value", ["http://127.0.0.1:18081", "127.0.0.1:port", "files.example/images", "", "user@host"]
)
def test_an_allow_host_it_cannot_use_is_refused_with_the_reason(value):
    from pydantic import ValidationError

    from totask_ray import RunOptions

    with pytest.raises(ValidationError, match=r"is not a host or host:port \(e\.g\. files\.example"):
        RunOptions(allowed_hosts=[value])


# -- byte caps -------------------------------------------------------------------------------------


def test_every_download_has_a_byte_cap():
    sent: list[int] = []

    async def endless():
        for _ in range(1000):
            sent.append(1)
            yield b" " * 1024

    rec = Recorder(
        {
            # no Content-Length: counted while streaming, and the stream is abandoned
            "/stream.json": httpx.Response(
                200, content=endless(), headers={"content-type": "application/json"}
            ),
            # a declared size over the cap is refused before the body is read
            "/declared.json": httpx.Response(
                200,
                content=b"{}",
                headers={"content-type": "application/json", "content-length": "104857600"},
            ),
            "/big.png": httpx.Response(
                200, content=b"\x89PNG" + b"\0" * 5000, headers={"content-type": "image/png"}
            ),
        }
    )
    policy = UrlPolicy.for_platform(PLATFORM)
    with pytest.raises(DownloadError, match=r"stream.json is over the 4,096-byte limit"):
        _fetch(
            Downloader(policy, transport=httpx.MockTransport(rec)), f"{PLATFORM}/stream.json", max_bytes=4096
        )
    assert len(sent) < 10  # stopped reading, not 1000 chunks
    with pytest.raises(DownloadError, match=r"is 104,857,600 bytes, over the 10,485,760-byte limit"):
        _fetch(Downloader(policy, transport=httpx.MockTransport(rec)), f"{PLATFORM}/declared.json")

    async def image():
        dl = Downloader(policy, transport=httpx.MockTransport(rec))
        try:
            return await dl.fetch_image(f"{PLATFORM}/big.png", max_bytes=1000)
        finally:
            await dl.aclose()

    with pytest.raises(DownloadError, match=r"big.png is 5,004 bytes, over the 1,000-byte limit"):
        asyncio.run(image())


# -- the embedded platform -------------------------------------------------------------------------


def test_embedded_platform_binds_loopback_and_guards_its_endpoints(platform):
    import psutil

    from totask_ray.embedded.server import LocalPlatform

    assert inspect.signature(LocalPlatform).parameters["host"].default == "127.0.0.1"
    assert platform.url.startswith("http://127.0.0.1:")
    listening = [
        c.laddr for c in psutil.Process(platform.pid).net_connections("inet") if c.status == "LISTEN"
    ]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
    with httpx.Client(base_url=platform.url) as anon:
        assert anon.get("/health/").status_code == 200
        assert anon.get("/projects/1/").status_code == 401


# -- the token appears nowhere after the failure scenarios -------------------------------------------


@pytest.mark.slow
def test_cli_over_the_bad_input_project_leaks_no_token(platform, ray_cluster, tmp_path):
    """`totask-ray run` over every per-task failure of tests/test_bad_input.py (plus bad params),
    with `localhost` on the allow-list: then grep everything the run left for the token."""
    token = platform.token
    store = platform.store
    gcs = ray_cluster.get_runtime_context().gcs_address
    job_id = store.create_job("to_task")
    report = tmp_path / "report.jsonl"
    with bad_input_project(platform, "security") as (project, good_ids, cases, goods, routes, files):
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump({"name": "Security_Job", "project": project,
                                       "target_specification_name": "annotation_data"}))  # fmt: skip
        run = subprocess.run(
            [str(BIN / "totask-ray"), "run", str(job), "--address", gcs, "--report", str(report),
             "--job-id", str(job_id), "--num-actors", "1", "--allow-host", "localhost", "--allow-host", files],
            env=cli_env(platform), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    bad_job = tmp_path / "bad.yaml"
    bad_job.write_text(yaml.safe_dump({"name": f"x {token}", "project": token, "batch_size": token}))
    bad = subprocess.run([str(BIN / "totask-ray"), "run", str(bad_job)], env=cli_env(platform),
                         capture_output=True, text=True, timeout=120)  # fmt: skip

    assert run.returncode == 2, run.stderr[-3000:]  # some tasks failed
    assert bad.returncode == 1 and "name: must not contain whitespace" in bad.stderr, bad.stderr[-2000:]
    # allow-listed now: the localhost cases are fetched and written; the default 10 MiB cap lets the
    # "oversized" file through; everything else still fails with its message
    allowed = {
        "localhost (loopback, not the platform's host string)",
        "redirect to localhost",
        "10x over the size cap",
    }
    outcomes = read_report(report)
    for name, case in cases.items():
        rec = outcomes[case.task_id]
        if name in allowed:
            assert rec["status"] in ("success", "empty"), (name, rec)  # written (empty: no object)
        else:
            assert rec["status"] == "failed" and case.words in rec["error"], (name, rec)
            assert f"[Task {case.task_id}] Failed: {rec['error']}" in run.stderr
    assert all(outcomes[t]["status"] in ("success", "empty") for t in good_ids)
    assert {NEVER[0], NEVER[3]} <= set(routes.requested) and not {NEVER[1], NEVER[2]} & set(routes.requested)
    assert (
        f"{len(goods) + len(allowed)} succeeded" in run.stdout
        and f"{len(cases) - len(allowed)} failed" in run.stdout
    )

    texts = {
        "stdout": run.stdout + bad.stdout,
        "stderr": run.stderr + bad.stderr,
        "report": report.read_text(),
    }
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    texts["job"] = json.dumps(store.get_job(job_id))
    texts["platform logs"] = json.dumps(store.logs())
    assert store.get_job(job_id)["status"] == "SUCCEEDED"
    assert [where for where, text in texts.items() if token in text] == [], "the platform token leaked"
    for where in ("stdout", "stderr", "report", "job"):
        assert SIG not in texts[where] and "signature=" not in texts[where], where
        assert "Traceback" not in texts[where], where


# -- URLs quoted inside exception text -------------------------------------------------------------


def test_a_hook_exception_quoting_a_signed_url_is_redacted():
    from totask_ray.pipeline.annotator import safe_error

    url = f"http://127.0.0.1:8000/media/a.json?expires=1&signature={SIG}"
    response = httpx.Response(404, request=httpx.Request("GET", url))
    leaks = []
    for exc in (
        httpx.HTTPStatusError(
            "Client error '404 Not Found' for url '" + url + "'", request=response.request, response=response
        ),
        ValueError(f"cannot read '{url}'"),
        ValueError(f"cannot read ({url})"),
        ValueError(f"cannot read url={url}"),
        ValueError(f"cannot read s3://bucket/a.json?X-Amz-Signature={SIG}"),  # any scheme, not only http(s)
    ):
        if SIG in safe_error(exc):
            leaks.append(type(exc).__name__)
    assert leaks == []
