"""Fetching the files that tasks point at, without trusting the URLs.

A task's file URL comes from outside. Before any byte is fetched: only http and https; private,
loopback, link-local and other non-public addresses are refused unless the host is the platform's
own or on the allow-list, checked after DNS resolution and again on every redirect; every download
has a byte cap. Errors name the host and the problem, never the query string (a signed URL's
signature is a credential).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from totask_ray.platform.errors import redact_url

DEFAULT_MAX_JSON_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_REDIRECTS = 5
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


@dataclass(frozen=True)
class UrlPolicy:
    """Which hosts may be fetched. The platform's own host is always allowed."""

    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    allow_private: bool = False

    @classmethod
    def for_platform(
        cls, platform_url: str | None, extra_hosts: Iterable[str] = (), allow_private: bool = False
    ) -> UrlPolicy:
        hosts = {h.lower() for h in extra_hosts}
        if platform_url:
            host = urlsplit(platform_url).hostname
            if host:
                hosts.add(host.lower())
        return cls(allowed_hosts=frozenset(hosts), allow_private=allow_private)

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

    def host_allowed(self, host: str) -> bool:
        return self.allow_private or host in self.allowed_hosts

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        if self.host_allowed(host):
            return
        for addr in addresses:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
            if not ip.is_global or ip.is_multicast:
                raise DownloadError(
                    f"refusing to fetch from {host}: it resolves to a private, loopback or link-local address; "
                    "add the host to the allow-list if it is trusted"
                )


async def _resolve(host: str, port: int) -> list[str]:
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise DownloadError(f"cannot resolve host {host}") from None
    return [info[4][0] for info in infos]


class Downloader:
    """Async, bounded, policy-checked downloads over one shared connection pool."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.policy = policy
        if transport is None:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=httpx.Limits(max_connections=max_connections))
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            follow_redirects=False,
        )

    async def fetch(self, url: str, *, max_bytes: int, content_types: tuple[str, ...]) -> tuple[bytes, str]:
        """The body and content type of `url`, following at most MAX_REDIRECTS checked redirects."""
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            host, port = self.policy.check_url(current)
            self.policy.check_addresses(host, await _resolve(host, port))
            try:
                async with self._http.stream("GET", current) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location")
                        if not location:
                            raise DownloadError(f"{redact_url(current)} redirected without a location")
                        current = urljoin(current, location)
                        continue
                    if resp.status_code >= 400:
                        raise DownloadError(
                            f"Failed to download from {redact_url(current)}: HTTP {resp.status_code}"
                        )
                    ctype = resp.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                    if ctype and not ctype.startswith(content_types) and not ctype.endswith("+json"):
                        raise DownloadError(
                            f"{redact_url(current)} has content type {ctype}, expected {content_types[0]}"
                        )
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise DownloadError(
                            f"{redact_url(current)} is {int(declared):,} bytes, over the {max_bytes:,}-byte limit"
                        )
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise DownloadError(f"{redact_url(current)} is over the {max_bytes:,}-byte limit")
                        chunks.append(chunk)
                    return b"".join(chunks), ctype
            except httpx.TimeoutException:
                raise DownloadError(f"Failed to download from {redact_url(current)}: timed out") from None
            except httpx.HTTPError as exc:
                raise DownloadError(
                    f"Failed to download from {redact_url(current)}: {type(exc).__name__}"
                ) from None
        raise DownloadError(f"{redact_url(url)} redirected more than {MAX_REDIRECTS} times")

    async def fetch_json(self, url: str, *, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> Any:
        body, _ = await self.fetch(url, max_bytes=max_bytes, content_types=JSON_CONTENT_TYPES)
        return parse_json_bytes(body, "annotation file")

    async def fetch_image(self, url: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
        body, _ = await self.fetch(url, max_bytes=max_bytes, content_types=IMAGE_CONTENT_PREFIXES)
        return body

    async def aclose(self) -> None:
        await self._http.aclose()


def fetch_json_sync(
    url: str, policy: UrlPolicy, *, max_bytes: int = DEFAULT_MAX_JSON_BYTES, timeout_s: float = 30.0
) -> Any:
    """The same checks for a blocking caller (a plugin hook calling the default implementation)."""

    async def go() -> Any:
        dl = Downloader(policy, timeout_s=timeout_s, transport=httpx.AsyncHTTPTransport())
        try:
            return await dl.fetch_json(url, max_bytes=max_bytes)
        finally:
            await dl.aclose()

    return asyncio.run(go())
