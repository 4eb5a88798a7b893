"""aiohttp underneath the async platform client and the downloader.

Each task costs three HTTP exchanges (read the task, fetch its file, write the annotation), so the
client's own CPU per request bounds an actor's throughput. httpx's request/response models on top
of aiohttp (its aiohttp transport) doubled that cost when profiled (bench/ and BENCHMARKS.md):
URL parsing, header models, and a cookie jar run through `urllib.request` on every answer. The
workers therefore speak aiohttp directly, and everything above the wire stays shared with the
blocking httpx client: the `Reply` here has the attributes the retry policy and error mapping read
(`status_code`, `headers`, `content`, `json()`, `text`), and aiohttp's failures are raised as the
httpx exceptions those already classify (`could not connect`, `timed out`, replayable or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Reply:
    """A whole answer, read: what `_Core.finish` and `RetryPolicy.delay` need of a response."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def url(text: str) -> Any:
    """A URL sent exactly as given when it is already encoded (a signed URL's signature covers its
    exact bytes; re-quoting it can break it); otherwise encoded by yarl."""
    import yarl

    return yarl.URL(text, encoded=text.isascii() and not any(c in text for c in ' "<>\\^`{|}'))


def dumps(body: Any) -> bytes:
    """A JSON request body as httpx would send it: compact, UTF-8, no NaN."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def transport_error(exc: BaseException) -> httpx.TransportError | None:
    """aiohttp's (or asyncio's) failure as the httpx error of the same meaning, chained to it;
    None for an exception that is not a transport failure (let it propagate)."""
    import aiohttp

    kind: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError  # never reached the server: even a POST may be replayed
    elif isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(exc, asyncio.TimeoutError):  # aiohttp's socket timeouts are TimeoutErrors too
        kind = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientPayloadError):
        kind = httpx.ReadError
    elif isinstance(exc, aiohttp.InvalidURL):
        kind = httpx.UnsupportedProtocol
    elif isinstance(exc, aiohttp.ClientError):
        kind = httpx.RemoteProtocolError  # the server hung up or answered garbage
    else:
        return None
    err = kind(str(exc) or type(exc).__name__)
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def transport_errors() -> Iterator[None]:
    """Inside: aiohttp's transport failures leave as `transport_error` makes them; anything else
    (a policy refusal from the resolver, a bug) leaves unchanged."""
    try:
        yield
    except Exception as exc:
        mapped = transport_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


def session(limit: int, *, resolver: Any = None, ssl: Any = None) -> Any:
    """One pooled aiohttp session: no cookies (the platform authenticates by header, and a cookie
    jar costs CPU on every answer), no redirects followed implicitly (callers check each hop)."""
    import aiohttp

    connector = aiohttp.TCPConnector(
        limit=limit, resolver=resolver, ssl=httpx.create_ssl_context() if ssl is None else ssl
    )
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


def timeout(read_s: float, connect_s: float) -> Any:
    """httpx's meaning: `connect_s` to open a connection, `read_s` between bytes of the answer."""
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)
