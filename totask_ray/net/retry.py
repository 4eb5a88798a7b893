"""When to try an HTTP request again, and after how long: one policy for the platform and downloads.

Retried: 429/502/503/504 and transport errors, with exponential backoff and jitter (many actors
must not retry in lockstep), `Retry-After` honoured up to a cap. A request that may have been
applied is never replayed unless it is idempotent: a non-idempotent call is retried only when the
server refused it before acting (429, 503) or the connection was never made.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

from totask_ray.net.wire import Reply

RETRY_STATUSES = frozenset({429, 502, 503, 504})
NOT_APPLIED_STATUSES = frozenset({429, 503})


def never_connected(exc: BaseException) -> bool:
    """True when the request certainly never reached the server (safe to replay anything).

    `totask_ray.net.wire` raises aiohttp's failures as httpx errors chained to them; the aiohttp cause
    decides: `ClientConnectorError` and its kinds (DNS, refused, TLS) all fail before a byte is sent.
    """
    if isinstance(exc, httpx.ConnectError):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with ray
        return False
    return isinstance(exc.__cause__, aiohttp.ClientConnectorError)


def describe_transport_error(exc: BaseException) -> str:
    """A failed exchange in words: "could not connect", "timed out", or the error's kind."""
    cause = exc.__cause__
    if never_connected(exc) or (isinstance(cause, OSError) and not isinstance(cause, TimeoutError)):
        return "could not connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return type(exc).__name__


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 60.0

    def delay(
        self,
        attempt: int,
        *,
        replayable: bool,
        response: httpx.Response | Reply | None = None,
        exc: BaseException | None = None,
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when this outcome is final."""
        if attempt >= self.retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            if not replayable and response.status_code not in NOT_APPLIED_STATUSES:
                return None
            after = retry_after_seconds(response.headers.get("Retry-After"))
            if after is not None:
                return min(after, self.max_retry_after_s)
        elif exc is not None:
            if not isinstance(exc, httpx.TransportError):
                return None
            if not replayable and not never_connected(exc):
                return None
        backoff = min(self.backoff_s * (2**attempt), self.max_backoff_s)
        return backoff * (0.5 + random.random() / 2)
