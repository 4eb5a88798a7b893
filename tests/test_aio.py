"""The workers' aiohttp wire: URLs sent byte for byte, failures classified as the retry policy
expects. Real sockets on 127.0.0.1 throughout (an aiohttp server records what arrives)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from aiohttp import web

from totask_ray.net import wire as aio
from totask_ray.net.downloads import Downloader, UrlPolicy
from totask_ray.net.retry import describe_transport_error, never_connected


async def _serve(handler):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def _failure(url: str, timeout) -> BaseException:
    """The httpx error `aio.transport_error` makes of what one GET through a session raises."""
    session = aio.session(4)  # on the running loop: aiohttp sessions belong to one
    try:
        async with session.get(url, timeout=timeout) as r:
            await r.read()
    except Exception as exc:
        mapped = aio.transport_error(exc)
        assert mapped is not None, exc
        return mapped
    finally:
        await session.close()
    raise AssertionError(f"GET {url} did not fail")


def test_signed_url_reaches_the_server_exactly_as_given():
    """A signature covers the URL's exact bytes: %2F, %7E and '+' must not be re-quoted."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"objects": []})

    async def go() -> object:
        runner, base = await _serve(handler)
        dl = Downloader(UrlPolicy.for_platform(base))
        try:
            return await dl.fetch_json(f"{base}/media/a%2Fb%7Ec.json?sig=ab%2Bcd%3D%3D&exp=1+2")
        finally:
            await dl.aclose()
            await runner.cleanup()

    assert asyncio.run(go()) == {"objects": []}
    assert seen == ["/media/a%2Fb%7Ec.json?sig=ab%2Bcd%3D%3D&exp=1+2"]


def test_url_with_raw_spaces_is_encoded_not_sent_broken():
    assert str(aio.url("http://h/a b.json")) == "http://h/a%20b.json"
    assert str(aio.url("http://h/a%20b.json?s=x%2Fy")) == "http://h/a%20b.json?s=x%2Fy"


def test_refused_connection_is_never_connected_and_said_so():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    err = asyncio.run(_failure(f"http://127.0.0.1:{port}/x", aio.timeout(2, 2)))
    assert isinstance(err, httpx.ConnectError)
    assert never_connected(err)  # so even a POST may be replayed
    assert describe_transport_error(err) == "could not connect"


def test_slow_answer_is_a_read_timeout():
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def go() -> BaseException:
        runner, base = await _serve(handler)
        try:
            return await _failure(f"{base}/slow", aio.timeout(0.3, 2))
        finally:
            await runner.cleanup()

    err = asyncio.run(go())
    assert isinstance(err, httpx.ReadTimeout)
    assert not never_connected(err)  # the request was sent: only idempotent calls are replayed
    assert describe_transport_error(err) == "timed out"


@pytest.mark.parametrize("exc", [ValueError("not a transport failure"), KeyError("x")])
def test_other_exceptions_are_not_mapped(exc):
    assert aio.transport_error(exc) is None
