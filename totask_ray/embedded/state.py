"""What the gate and the handlers of one platform share: its store, media dir, token and runner.

One `PlatformState` is made per app and stored on Starlette's `app.state.platform`, so a handler
is a plain module-level function that looks its platform up from the request; the gate holds the
same object and reads it on every request (fault injection swaps `faults` while the app runs).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.requests import Request

from .faults import Faults
from .store import Store

__all__ = ["PlatformState", "media_signature", "platform_of"]


class PlatformState:
    def __init__(
        self,
        store: Store,
        media_dir: Path,
        token: str,
        tenant: str | None,
        latency_ms: float,
        fault_injection: bool,
        plugin_runner: Any,
    ):
        if not token:
            raise ValueError("the platform needs a non-empty token")
        self.store = store
        self.media_dir = Path(media_dir)
        self.media_dir.mkdir(parents=True, exist_ok=True)
        self.media_root = os.path.realpath(self.media_dir)
        self.token = token
        self._token_b = token.encode()
        self._tenant_b = tenant.encode() if tenant else None
        self.tenant = tenant
        self.latency_s = max(0.0, float(latency_ms)) / 1000.0
        self.fault_injection = fault_injection
        self.faults: Faults | None = None
        self.plugin_runner = plugin_runner
        self._sign_key = _media_key(token)

    # auth: constant-time comparisons, so a wrong token says nothing about the right one
    def _token_ok(self, value: bytes) -> bool:
        keyword, _, rest = value.partition(b" ")
        return keyword.lower() == b"token" and hmac.compare_digest(rest.strip(), self._token_b)

    def check_auth(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        given = False
        ok = False
        tenant: bytes | None = None
        for name, value in headers:
            if name in (b"synapse-access-token", b"authorization"):
                given = True
                if not ok and self._token_ok(value):
                    ok = True
            elif name == b"synapse-tenant":
                tenant = value
        if not given:
            return 401, "Authentication credentials were not provided."
        if not ok:
            return 401, "Invalid token."
        if self._tenant_b is not None:
            keyword, _, rest = (tenant or b"").partition(b" ")
            if keyword.lower() != b"token" or not hmac.compare_digest(rest.strip(), self._tenant_b):
                return 403, "You do not have permission to perform this action: wrong or missing tenant."
        return None

    def header_token_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return any(n in (b"synapse-access-token", b"authorization") and self._token_ok(v) for n, v in headers)

    # signed media URLs: whoever is handed a task's file URL can fetch it without the token
    def sign(self, rel_path: str, expires: int) -> str:
        return _sign(self._sign_key, rel_path, expires)

    def media_url(self, base: str, rel_path: str, expires: int) -> str:
        signature = self.sign(rel_path, expires)
        return f"{base}/media/{quote(rel_path, safe='/')}?expires={expires}&signature={signature}"


def platform_of(request: Request) -> PlatformState:
    """The platform a request was routed in (see the module docstring)."""
    return request.app.state.platform


def _media_key(token: str) -> bytes:
    return hmac.new(token.encode(), b"totask-ray media url signing v1", hashlib.sha256).digest()


def _sign(key: bytes, rel_path: str, expires: int) -> str:
    return hmac.new(key, f"{rel_path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def media_signature(token: str, rel_path: str, expires: int) -> str:
    """The `signature` of a media URL for `rel_path` (relative to the media dir) valid until the
    unix time `expires`: HMAC-SHA256 under a key derived from the platform's token."""
    return _sign(_media_key(token), rel_path, expires)
