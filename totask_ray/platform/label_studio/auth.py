"""Label Studio's personal access token, written once as an auth flow both clients drive.

A personal access token (a JWT refresh token) is traded at `/api/token/refresh/` for an access
token that lasts minutes; it is renewed before it expires and once more on a 401. A legacy key is
sent as `Authorization: Token ...` as it is. Neither ever appears in a message.

As in httpx, the flow is a generator: it yields the requests to send (the call, or a `Refresh`)
and is sent their answers or thrown their errors, so the blocking and the async client differ
only in how they send a request and which lock guards a trade (`drive` / `adrive`).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from totask_ray.platform.errors import AuthenticationError
from totask_ray.platform.http import Call, HttpCore, as_dict
from totask_ray.platform.label_studio.config import LabelStudioConfig

T = TypeVar("T")

REFRESH_PATH = "api/token/refresh/"
REFRESH_MARGIN_S = 30.0


@dataclass(frozen=True)
class Refresh:
    """A step of the flow: trade the token, unless another caller already replaced `stale`."""

    stale: str | None


Flow = Generator["Call[Any] | Refresh", Any, T]


def _jwt_expiry(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _access(body: Any) -> str:
    token = as_dict(body).get("access")
    if not isinstance(token, str) or not token:
        raise ValueError("no access token in the answer")
    return token


class TokenAuth:
    """The access token a client holds, and the flow that keeps it fresh."""

    def __init__(self, config: LabelStudioConfig, core: HttpCore) -> None:
        self.config = config
        self._core = core
        self.access: str | None = None
        self._expires = 0.0

    def fresh(self) -> bool:
        return time.time() < self._expires - REFRESH_MARGIN_S

    def flow(self, call: Call[T] | None) -> Flow[T | None]:
        """Send `call` with a fresh access token (None: only make sure the token is fresh)."""
        if not self.config.personal_token:
            return (yield call) if call is not None else None
        if not self.fresh():
            yield Refresh(self.access)
        if call is None:
            return None
        try:
            return (yield call)
        except AuthenticationError:
            yield Refresh(self.access)  # revoked or expired early: one fresh access token, once
            return (yield call)

    def trade(self, step: Refresh) -> Call[str] | None:
        """The trade, sent without the (maybe expired) access token: LS refuses a bad Bearer
        first. None when another caller traded since `step` was yielded."""
        if self.access != step.stale and self.fresh():
            return None
        self._core.set_headers(self.config.headers())
        return Call("POST", REFRESH_PATH, _access, json={"refresh": self.config.api_key.get_secret_value()})

    def use(self, access: str) -> None:
        self.access = access
        self._core.extra_secrets = [access]
        self._core.set_headers({**self.config.headers(), "Authorization": f"Bearer {access}"})
        self._expires = _jwt_expiry(access) or time.time() + 240


def _advance(flow: Flow[T], answer: Any = None, error: Exception | None = None) -> tuple[bool, Any]:
    """(done, the flow's next request), or (done, what it returned)."""
    try:
        return False, flow.throw(error) if error is not None else flow.send(answer)
    except StopIteration as done:
        return True, done.value


def _reply(send: Callable[[Any], Any], step: Any) -> tuple[Any, Exception | None]:
    try:
        return send(step), None
    except Exception as exc:
        return None, exc


def drive(flow: Flow[T], send: Callable[[Any], Any]) -> T:
    """Run a flow to its end, sending each request it yields with `send`."""
    done, step = _advance(flow)
    while not done:
        done, step = _advance(flow, *_reply(send, step))
    return step


async def adrive(flow: Flow[T], send: Callable[[Any], Awaitable[Any]]) -> T:
    """`drive`, for the async client."""
    done, step = _advance(flow)
    while not done:
        try:
            answer, error = await send(step), None
        except Exception as exc:
            answer, error = None, exc
        done, step = _advance(flow, answer, error)
    return step
