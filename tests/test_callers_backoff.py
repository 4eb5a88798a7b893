"""A call refused by back-pressure waits until one of its caller's own calls moves on, not a blind
back-off (`methods/inference/callers.py`, issue 25).

Serve counts a handle's queue per router, so a refused call's place is held by its caller's own queued
call and frees when that call reaches a replica. The calls here are coroutines scripted to be refused
(Serve's own `BackPressureError`, as a full router raises it) and to reach "a replica" after a delay;
what is under test is only the caller's waiting. The whole path through real Serve is
`test_inference_flow.py::test_an_overloaded_replica_set_backs_off_and_fails_nothing` and
`bench overload`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.serve.exceptions import BackPressureError

from totask_ray.methods.inference.callers import Caller, RetryBudget


class Scripted(Caller):
    """A caller whose every try is the coroutine the test hands `_call`."""

    async def _attempt(self, make: Any) -> Any:
        return await make()

    async def answer(self, ready: list) -> list:  # pragma: no cover - not used here
        raise NotImplementedError


def _refused_once(answer: str) -> Any:
    tries = iter([True])

    async def call() -> str:
        if next(tries, False):
            raise BackPressureError(num_queued_requests=1, max_queued_requests=1)
        return answer

    return call


def test_a_refused_call_goes_again_as_soon_as_its_callers_queued_call_moves_on():
    caller = Scripted(None, timeout_s=5, budget=RetryBudget(first_backoff_s=4.0, max_backoff_s=4.0))

    async def queued() -> str:  # holds the queue's place, reaches a replica after 0.2 s
        await asyncio.sleep(0.2)
        caller._moved_on()
        await asyncio.sleep(0.1)
        return "first"

    async def both() -> tuple[Any, Any]:
        return await asyncio.gather(
            caller._call(queued, "first"), caller._call(_refused_once("second"), "second")
        )

    t0 = time.monotonic()
    (a, _), (b, counts) = asyncio.run(both())
    waited = time.monotonic() - t0
    assert (a, b, counts.backoffs) == ("first", "second", 1)
    # its back-off was 2-4 s (jittered): it went again when the queued call moved on, at 0.2 s
    assert waited < 1.5, f"the refused call waited {waited:.2f} s, not for the queued call to move on (0.2 s)"


def test_with_nothing_of_its_caller_moving_a_refused_call_waits_its_back_off():
    caller = Scripted(None, timeout_s=5, budget=RetryBudget(first_backoff_s=0.6, max_backoff_s=0.6))
    t0 = time.monotonic()
    answer, counts = asyncio.run(caller._call(_refused_once("only"), "only"))
    waited = time.monotonic() - t0
    assert (answer, counts.backoffs) == ("only", 1)
    assert waited >= 0.3, f"the refused call went again after {waited:.2f} s, before its back-off (0.3-0.6 s)"
