"""The downloader's own errors never carry a signed URL's query (its signature, a credential).

`DownloadError` reaches plugin code directly (a hook calling `fetch_json_sync` or the async
downloader), before any other layer redacts anything, so every failure kind is driven here against
real loopback HTTP servers and sockets, with a URL carrying `?sig=SECRET123&exp=...`, and the
error - its message, its repr, its args and every exception chained to it - must not hold the
secret. Each case also checks the message names its failure, so a case cannot pass by failing in
some other, accidentally clean, way.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from totask_ray.net.downloads import Downloader, DownloadError, UrlPolicy, fetch_json_sync
from totask_ray.net.retry import RetryPolicy

SECRET = "SECRET123"
QUERY = f"?sig={SECRET}&exp=1999999999"
MAX_BYTES = 1000
TIMEOUT_S = 0.5
LOOPBACK = UrlPolicy(allowed_hosts=frozenset({"127.0.0.1"}))  # only the IP literal: "localhost" is not


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        port = self.server.server_address[1]
        if path == "/ok.json":
            self._send(200, "application/json", b'{"objects": []}')
        elif path == "/gone.json":
            self._send(404, "text/plain", b"not found")
        elif path == "/broken.json":
            self._send(500, "text/plain", b"boom")
        elif path == "/slow.json":
            time.sleep(TIMEOUT_S * 4)  # headers never come within the read timeout
            self._send(200, "application/json", b"{}")
        elif path == "/big.json":  # declared too large
            self._send(200, "application/json", b"[" + b"1," * MAX_BYTES + b"1]")
        elif path == "/big-stream.json":  # no Content-Length: found too large while reading
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"[" + b"1," * MAX_BYTES + b"1]")
            self.close_connection = True
        elif path in ("/big.png", "/big-stream.png"):
            body = b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BYTES * 2
            if path == "/big.png":
                self._send(200, "image/png", body)
            else:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
        elif path == "/page.html":
            self._send(200, "text/html", b"<html>login</html>")
        elif path == "/bad.json":
            self._send(200, "application/json", b"{not json")
        elif path == "/latin1.json":
            self._send(200, "application/json", b'{"label": "caf\xe9"}')
        elif path == "/to-localhost.json":  # same server, by a name the policy does not allow
            self._redirect(f"http://localhost:{port}/ok.json{QUERY}")
        elif path == "/to-private.json":
            self._redirect(f"http://10.1.2.3/ok.json{QUERY}")
        elif path == "/to-ftp.json":
            self._redirect(f"ftp://127.0.0.1:{port}/ok.json{QUERY}")
        elif path == "/loop.json":
            self._redirect(f"/loop.json{QUERY}")
        elif path == "/no-location.json":
            self._send(302, "text/plain", b"")
        else:
            self._send(404, "text/plain", b"nope")

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def refused() -> str:
    """A loopback port nothing listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def unanswered() -> Iterator[str]:
    """A listener whose accept queue is full and never drained: a new connection's SYN is dropped,
    so connecting times out (aiohttp's connect-timeout error quotes the whole URL it was given)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for c in fillers:
            c.close()
        listener.close()


# (case, base fixture, path, policy, what the message must say)
CASES: list[tuple[str, str, str, UrlPolicy, str]] = [
    ("http 404", "server", "/gone.json", LOOPBACK, "HTTP 404"),
    ("http 500", "server", "/broken.json", LOOPBACK, "HTTP 500"),
    ("connection refused", "refused", "/x.json", LOOPBACK, "could not connect"),
    ("read timeout", "server", "/slow.json", LOOPBACK, "timed out"),
    ("connect timeout", "unanswered", "/x.json", LOOPBACK, "timed out"),
    ("declared too large", "server", "/big.json", LOOPBACK, "limit"),
    ("streamed too large", "server", "/big-stream.json", LOOPBACK, "limit"),
    ("wrong content type", "server", "/page.html", LOOPBACK, "content type text/html"),
    ("invalid json", "server", "/bad.json", LOOPBACK, "Invalid JSON"),
    ("invalid utf-8", "server", "/latin1.json", LOOPBACK, "not valid UTF-8"),
    (
        "redirect to a refused name",
        "server",
        "/to-localhost.json",
        LOOPBACK,
        "refusing to fetch from localhost",
    ),
    (
        "redirect to a private address",
        "server",
        "/to-private.json",
        LOOPBACK,
        "refusing to fetch from 10.1.2.3",
    ),
    ("redirect to another scheme", "server", "/to-ftp.json", LOOPBACK, "not ftp://"),
    ("too many redirects", "server", "/loop.json", LOOPBACK, "redirected more than"),
    ("redirect without location", "server", "/no-location.json", LOOPBACK, "without a redirect location"),
    ("private address refused", "server", "/ok.json", UrlPolicy(), "refusing to fetch from 127.0.0.1"),
    ("private name refused", "server-by-name", "/ok.json", UrlPolicy(), "refusing to fetch from localhost"),
    ("non-http scheme", "ftp", "/ok.json", LOOPBACK, "not ftp://"),
    ("unresolvable host", "nowhere", "/ok.json", UrlPolicy(), "could not connect"),
]
IMAGE_CASES: list[tuple[str, str, str, UrlPolicy, str]] = [
    ("http 404", "server", "/gone.png", LOOPBACK, "HTTP 404"),
    ("connection refused", "refused", "/x.png", LOOPBACK, "could not connect"),
    ("connect timeout", "unanswered", "/x.png", LOOPBACK, "timed out"),
    ("declared too large", "server", "/big.png", LOOPBACK, "limit"),
    ("streamed too large", "server", "/big-stream.png", LOOPBACK, "limit"),
    ("json is no image", "server", "/ok.json", LOOPBACK, "content type application/json"),
    (
        "redirect to a refused name",
        "server",
        "/to-localhost.json",
        LOOPBACK,
        "refusing to fetch from localhost",
    ),
    ("too many redirects", "server", "/loop.json", LOOPBACK, "redirected more than"),
    ("private address refused", "server", "/ok.json", UrlPolicy(), "refusing to fetch from 127.0.0.1"),
    ("non-http scheme", "ftp", "/x.png", LOOPBACK, "not ftp://"),
]
# A connect timeout costs the sync path its 5 s connect limit per attempt (it has no knob for it):
# the async cases above cover that failure through the same Downloader.
SYNC_CASES = [c for c in CASES if c[0] != "connect timeout"]


def _url(request: pytest.FixtureRequest, base: str, path: str) -> str:
    if base == "server-by-name":
        return request.getfixturevalue("server").replace("127.0.0.1", "localhost") + path + QUERY
    if base == "ftp":
        return "ftp://127.0.0.1" + path + QUERY
    if base == "nowhere":
        return "http://no-such-host.invalid" + path + QUERY
    return request.getfixturevalue(base) + path + QUERY


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error and everything chained to it, explicitly or implicitly."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def assert_no_secret(exc: BaseException, must_say: str) -> None:
    assert isinstance(exc, DownloadError), f"expected a DownloadError, got {type(exc).__name__}: {exc}"
    assert must_say in str(exc), f"the error is not the expected failure: {exc}"
    for i, e in enumerate(_chain(exc)):
        where = "the error" if i == 0 else f"chained {type(e).__name__} #{i}"
        for shown in (str(e), repr(e), *(str(a) for a in e.args), *(repr(a) for a in e.args)):
            assert SECRET not in shown, f"{where} carries the signature: {shown!r}"


async def _async_failure(fetch: Callable[[Downloader], Any], policy: UrlPolicy) -> BaseException:
    dl = Downloader(policy, timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S, retry=RetryPolicy(retries=0))
    try:
        await fetch(dl)
    except Exception as exc:
        return exc
    finally:
        await dl.aclose()
    raise AssertionError("the download succeeded")


CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("case", "base", "path", "policy", "must_say"), CASES, ids=CASE_IDS)
def test_fetch_json_error_hides_signature(request, case, base, path, policy, must_say):
    url = _url(request, base, path)
    exc = asyncio.run(_async_failure(lambda dl: dl.fetch_json(url, max_bytes=MAX_BYTES), policy))
    assert_no_secret(exc, must_say)


@pytest.mark.parametrize(
    ("case", "base", "path", "policy", "must_say"), IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES]
)
def test_fetch_image_error_hides_signature(request, case, base, path, policy, must_say):
    url = _url(request, base, path)
    exc = asyncio.run(_async_failure(lambda dl: dl.fetch_image(url, max_bytes=MAX_BYTES), policy))
    assert_no_secret(exc, must_say)


@pytest.mark.parametrize(
    ("case", "base", "path", "policy", "must_say"), SYNC_CASES, ids=[c[0] for c in SYNC_CASES]
)
def test_fetch_json_sync_error_hides_signature(request, case, base, path, policy, must_say):
    """The blocking entry point a plugin hook calls (with the downloader's default retries)."""
    url = _url(request, base, path)
    with pytest.raises(DownloadError) as info:
        fetch_json_sync(url, policy, max_bytes=MAX_BYTES, timeout_s=TIMEOUT_S)
    assert_no_secret(info.value, must_say)


def test_signed_url_still_downloads(server):
    """The query is kept on the wire (the signature must reach the server), only kept out of errors."""
    assert fetch_json_sync(f"{server}/ok.json{QUERY}", LOOPBACK) == {"objects": []}
