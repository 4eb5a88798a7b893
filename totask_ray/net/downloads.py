"""Fetching the files that tasks point at, without trusting the URLs.

A task's file URL comes from outside. Before any byte is fetched: only http and https; private,
loopback, link-local and other non-public addresses are refused unless the host is the platform's
own or on the allow-list, checked after DNS resolution and again on every redirect; every download
has a byte cap. Errors name the host and the problem, never the query string (a signed URL's
signature is a credential).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from totask_ray.net import wire as aio
from totask_ray.net.images import MAX_IMAGE_BYTES
from totask_ray.net.redact import redact_url
from totask_ray.net.retry import RetryPolicy, describe_transport_error

log = logging.getLogger("totask_ray")

DEFAULT_MAX_JSON_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
JSON_CONTENT_TYPES = (
    "application/json",
    "text/json",
    "text/plain",
    "application/octet-stream",
    "binary/octet-stream",
)
IMAGE_CONTENT_PREFIXES = ("image/", "application/octet-stream", "binary/octet-stream")


class DownloadError(Exception):
    """A file could not be fetched or is not what it should be; safe to show to a user."""


def _bad_number(token: str) -> float:
    raise ValueError(f"{token} is not valid JSON")


def parse_json_bytes(body: bytes, what: str = "file") -> Any:
    """Strict JSON: UTF-8 (a BOM is tolerated), no NaN or Infinity."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DownloadError(f"{what} is not valid UTF-8 (bad byte at position {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_bad_number)
    except ValueError as exc:
        raise DownloadError(f"Invalid JSON format in {what}: {exc}") from None
    except RecursionError:
        raise DownloadError(f"Invalid JSON format in {what}: nested too deeply") from None


ALLOW_HOST_HINT = (
    "if it is trusted, add it to the allow-list: --allow-host {entry} (allowed_hosts in Python and in a "
    "serve app's options)"
)


def host_entry(host: str, port: int | None = None) -> str:
    """How the allow-list writes a host, or a host on one port: ``files.example``, ``10.0.0.5:9000``,
    ``[fd00::1]:9000``."""
    host = host.lower()
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed_host(value: str) -> str:
    """One allow-list entry, ``host`` (every port) or ``host:port`` (that port only), checked and
    written as :func:`host_entry` does; ``ValueError`` says what was wrong with it."""
    raw = str(value).strip()
    example = "e.g. files.example, 10.0.0.5 or 127.0.0.1:8080"
    if not raw or any(c in raw for c in "/?#@ \t") or "://" in raw:
        raise ValueError(f"{value!r} is not a host or host:port ({example}); give no scheme, path or user")
    if raw.count(":") > 1 and not raw.startswith("["):  # a bare IPv6 address: no port
        return host_entry(raw)
    try:
        parts = urlsplit(f"//{raw}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a host or host:port ({example}): {exc}") from None
    if not host:
        raise ValueError(f"{value!r} is not a host or host:port ({example})")
    return host_entry(host, port)


DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class UrlPolicy:
    """Which hosts may be fetched when they resolve to a private address: the platform's own origin
    (its host on its port: another port on a loopback host is another server) and the allow-list's
    entries (a host on every port, or ``host:port``)."""

    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    allow_private: bool = False
    platform_entry: str | None = None

    @classmethod
    def for_platform(
        cls, platform_url: str | None, extra_hosts: Iterable[str] = (), allow_private: bool = False
    ) -> UrlPolicy:
        hosts = {allowed_host(h) for h in extra_hosts}
        own = None
        if platform_url:
            parts = urlsplit(platform_url)
            if parts.hostname:  # its own origin only: another port on its host is another server
                own = host_entry(parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme))
                hosts.add(own)
        return cls(allowed_hosts=frozenset(hosts), allow_private=allow_private, platform_entry=own)

    def describe(self) -> str:
        """Which private hosts file URLs may point at, and why, for the run's log."""
        if self.allow_private:
            return "file URLs may point at any private or loopback address (allow_private_urls)"
        given = sorted(self.allowed_hosts - {self.platform_entry})
        parts = [f"{self.platform_entry} (the platform itself)"] if self.platform_entry else []
        parts += [f"{h} (--allow-host)" for h in given]
        return "private file hosts trusted: " + (", ".join(parts) or "none")

    def check_url(self, url: str) -> tuple[str, int]:
        """Scheme and shape; returns (host, port). Addresses are checked separately, after DNS."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise DownloadError("the file URL is malformed") from None
        if parts.scheme not in ("http", "https"):
            scheme = parts.scheme or "(none)"
            raise DownloadError(f"only http and https file URLs are allowed, not {scheme}://")
        if not parts.hostname:
            raise DownloadError("the file URL has no host")
        return parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)

    def host_allowed(self, host: str, port: int | None = None) -> bool:
        return (
            self.allow_private
            or host in self.allowed_hosts
            or (port is not None and host_entry(host, port) in self.allowed_hosts)
        )

    def check_addresses(self, host: str, addresses: Iterable[str], port: int | None = None) -> None:
        if self.host_allowed(host, port):
            return
        for addr in addresses:
            if not _is_public(ipaddress.ip_address(addr.split("%", 1)[0])):
                raise DownloadError(
                    f"refusing to fetch from {host}: it resolves to a private, loopback or link-local address; "
                    + ALLOW_HOST_HINT.format(entry=host_entry(host, port))
                )


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address; an IPv6 address that embeds an IPv4 one (mapped,
    IPv4-compatible, 6to4, NAT64) must embed a public one too: `::ffff:127.0.0.1` is loopback."""
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (int(ip) >> 32 == 0 or any(ip in net for net in _NAT64)):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _is_public(embedded)
    return True


def _policy_resolver(policy: UrlPolicy) -> Any:
    """An aiohttp resolver that applies `policy` to the addresses it connects to, so a name that
    resolves differently the second time (DNS rebinding) is still refused, before any connection."""
    from aiohttp.abc import AbstractResolver
    from aiohttp.resolver import DefaultResolver

    class PolicyResolver(AbstractResolver):
        def __init__(self) -> None:
            self._inner = DefaultResolver()

        async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> Any:
            results = await self._inner.resolve(host, port, family)
            policy.check_addresses(host.lower(), [r["host"] for r in results], port or None)
            return results

        async def close(self) -> None:
            await self._inner.close()

    return PolicyResolver()


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


async def _resolve(host: str, port: int) -> list[str]:
    if _ip_literal(host):
        return [host.strip("[]")]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise DownloadError(f"cannot resolve host {host}") from None
    return [info[4][0] for info in infos]


@dataclass
class _Hop:
    """One answer, open: status, headers and its body as chunks (read under a byte cap)."""

    status: int
    headers: Any
    chunks: Any  # AsyncIterator[bytes]


class Downloader:
    """Async, bounded, policy-checked downloads over one shared connection pool.

    Speaks aiohttp directly (see `totask_ray.net.wire`); its resolver checks every address it connects
    to, so a name is checked once per new connection, not once per file. An httpx `transport` may
    be given instead (tests inject answers through it); names are then resolved and checked
    before each request.
    """

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        headers: Callable[[str], Awaitable[Mapping[str, str]]] | None = None,
    ):
        self.policy = policy
        # credentials for one URL (asked again for each redirect hop, so another host gets none)
        self._headers = headers
        self.retry = retry or RetryPolicy(
            retries=4, backoff_s=0.25, max_backoff_s=5.0, max_retry_after_s=30.0
        )
        self._max_connections = max_connections
        self._timeout = aio.timeout(timeout_s, connect_timeout_s)
        self._session: Any = None
        self._httpx = (
            None
            if transport is None
            else httpx.AsyncClient(
                transport=transport,
                timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
                follow_redirects=False,
            )
        )

    async def fetch(self, url: str, *, max_bytes: int, content_types: tuple[str, ...]) -> tuple[bytes, str]:
        """The body and content type of `url`, following at most MAX_REDIRECTS checked redirects."""
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            host, port = self.policy.check_url(current)
            if not self.policy.host_allowed(host, port) and (self._httpx is not None or _ip_literal(host)):
                # aiohttp never asks its resolver about an IP literal; without aiohttp, nothing does
                self.policy.check_addresses(host, await _resolve(host, port), port)
            got = await self._get(current, max_bytes, content_types)
            if isinstance(got, str):  # a redirect: the next hop is checked like the first
                current = got
                continue
            return got
        raise DownloadError(f"{redact_url(url)} redirected more than {MAX_REDIRECTS} times")

    @contextlib.asynccontextmanager
    async def _open(self, url: str) -> AsyncIterator[_Hop]:
        headers = dict(await self._headers(url)) if self._headers is not None else None
        if self._httpx is not None:
            async with self._httpx.stream("GET", url, headers=headers) as resp:
                yield _Hop(resp.status_code, resp.headers, resp.aiter_bytes())
            return
        if self._session is None:
            self._session = aio.session(self._max_connections, resolver=_policy_resolver(self.policy))
        with aio.transport_errors():
            async with self._session.get(
                aio.url(url), headers=headers, allow_redirects=False, timeout=self._timeout
            ) as resp:
                yield _Hop(resp.status, resp.headers, resp.content.iter_chunked(CHUNK_BYTES))

    async def _get(self, url: str, max_bytes: int, content_types: tuple[str, ...]) -> tuple[bytes, str] | str:
        """One hop: the body, or the redirect's target; throttling and transport errors retried."""
        attempt = 0
        while True:
            failure = None
            try:
                async with self._open(url) as hop:
                    delay = self.retry.delay(
                        attempt, replayable=True, response=aio.Reply(hop.status, hop.headers, b"")
                    )
                    if delay is None:
                        return await self._read(url, hop, max_bytes, content_types)
                    status = hop.status
            except httpx.HTTPError as exc:
                delay = self.retry.delay(attempt, replayable=True, exc=exc)
                if delay is None:
                    failure = describe_transport_error(exc)
                status = None
            if failure is not None:
                # raised out here, not in the except block: `from None` only hides the chain, and
                # the transport error in `__context__` quotes the whole URL (aiohttp's connect
                # timeout does), signature included
                raise DownloadError(f"Failed to download from {redact_url(url)}: {failure}")
            log.debug("retrying %s in %.2f s (HTTP %s)", redact_url(url), delay, status)
            attempt += 1
            await asyncio.sleep(delay)

    @staticmethod
    async def _read(
        url: str, hop: _Hop, max_bytes: int, content_types: tuple[str, ...]
    ) -> tuple[bytes, str] | str:
        if 300 <= hop.status < 400 and hop.status != 304:
            location = hop.headers.get("location")
            if not location:
                raise DownloadError(
                    f"Failed to download from {redact_url(url)}: HTTP {hop.status} without a redirect location"
                )
            return urljoin(url, location)
        if hop.status >= 400:
            raise DownloadError(f"Failed to download from {redact_url(url)}: HTTP {hop.status}")
        ctype = hop.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype and not ctype.startswith(content_types) and not ctype.endswith("+json"):
            raise DownloadError(f"{redact_url(url)} has content type {ctype}, expected {content_types[0]}")
        declared = hop.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise DownloadError(
                f"{redact_url(url)} is {int(declared):,} bytes, over the {max_bytes:,}-byte limit"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in hop.chunks:
            size += len(chunk)
            if size > max_bytes:
                raise DownloadError(f"{redact_url(url)} is over the {max_bytes:,}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks), ctype

    async def fetch_json(self, url: str, *, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> Any:
        body, _ = await self.fetch(url, max_bytes=max_bytes, content_types=JSON_CONTENT_TYPES)
        return parse_json_bytes(body, "annotation file")

    async def fetch_image(self, url: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
        body, _ = await self.fetch(url, max_bytes=max_bytes, content_types=IMAGE_CONTENT_PREFIXES)
        return body

    async def aclose(self) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()
        if self._session is not None:
            await self._session.close()
            self._session = None


def fetch_json_sync(
    url: str, policy: UrlPolicy, *, max_bytes: int = DEFAULT_MAX_JSON_BYTES, timeout_s: float = 30.0
) -> Any:
    """The same checks for a blocking caller (a plugin hook calling the default implementation)."""

    async def go() -> Any:
        dl = Downloader(policy, timeout_s=timeout_s)
        try:
            return await dl.fetch_json(url, max_bytes=max_bytes)
        finally:
            await dl.aclose()

    return asyncio.run(go())
