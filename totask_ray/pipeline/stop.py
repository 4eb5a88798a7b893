"""A run-wide stop flag that the annotators and the id reads see within a fraction of a second.

A graceful stop must stop handing out work everywhere at once while the tasks already started
finish and report: the driver cannot reach into Ray Data's actors, so the flag is a tiny Ray actor
(no CPU, on the driver's node) that the driver sets. Each annotator keeps one call waiting on it,
which the stop answers (no polling: an idle pool costs the flag nothing, whatever its size); the id
reads check it between pages, so a stopped run does not go on listing a million ids nobody will
annotate. The driver ends a run by saying so (`finish`), then removes the flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("totask_ray")

# A flag's three states; an annotator waits for the state to leave the one it knows.
RUNNING, STOPPED, OVER = "running", "stopped", "over"
# Calls the flag holds at once: one outstanding wait per annotator actor, plus the reads' checks.
MAX_WAITERS = 100_000
# How long `finish` waits for its waiters to say they heard before the driver removes the flag.
FINISH_DRAIN_S = 2.0


def _flag_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_concurrency=MAX_WAITERS)
    class StopFlag:
        """Pushes its state: `wait(known)` returns when the state is not `known`, so an idle
        annotator costs one outstanding call, not a call every fraction of a second."""

        def __init__(self) -> None:
            self._state = RUNNING
            self._changed = asyncio.Event()
            self._waiting = 0
            self._to_ack = 0
            self._acked = asyncio.Event()
            self.calls = 0

        def _move(self, state: str) -> None:
            self._state = state
            self._changed.set()
            self._changed = asyncio.Event()

        async def set(self) -> None:
            if self._state == RUNNING:
                self._move(STOPPED)

        async def finish(self) -> None:
            """The run is over (said by the driver, not inferred from a lost actor): every wait
            returns OVER. Returns once each watcher that was waiting said it heard (`ack`), or after
            FINISH_DRAIN_S: removing the flag sooner could lose an answer on its way."""
            self._to_ack = self._waiting
            if not self._to_ack:
                self._acked.set()
            self._move(OVER)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), FINISH_DRAIN_S)

        async def ack(self) -> None:
            self._to_ack -= 1
            if self._to_ack <= 0:
                self._acked.set()

        async def is_set(self) -> bool:
            self.calls += 1
            return self._state != RUNNING

        async def wait(self, known: str) -> str:
            self.calls += 1
            self._waiting += 1
            try:
                while self._state == known:
                    await self._changed.wait()
                return self._state
            finally:
                self._waiting -= 1

        async def stats(self) -> dict[str, int]:
            """Calls taken so far and waits outstanding (what the tests and the bench read)."""
            return {"calls": self.calls, "waiting": self._waiting}

    return StopFlag


def create_flag() -> Any:
    """A new flag for one run (an actor handle: picklable, so it travels in the actors' settings),
    on the driver's node: it lives and dies with the driver, whichever worker nodes come and go."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return _flag_class().options(scheduling_strategy=here).remote()


def finish(flag: Any, timeout_s: float = 5.0) -> None:
    """Tell every annotator the run is over, then remove the flag."""
    import ray

    with contextlib.suppress(Exception):  # gone already, or slow: the waits end with the actor all the same
        ray.get(flag.finish.remote(), timeout=timeout_s)
    with contextlib.suppress(Exception):
        ray.kill(flag)


def is_set(flag: Any, timeout_s: float = 5.0) -> bool:
    """Blocking check (the id reads, once a page); a flag that cannot be reached counts as not set."""
    import ray

    if flag is None:
        return False
    try:
        return bool(ray.get(flag.is_set.remote(), timeout=timeout_s))
    except Exception:
        return False


class StopWatch:
    """An annotator's view of the flag: `stopped` is pushed to it by one outstanding wait.

    The flag also tells an actor that its run is over: the driver says so once every outcome is
    in, and `on_run_over` is called then (an annotator lets go of what would keep it alive after
    Ray Data releases it: an actor holding a Serve handle otherwise takes Ray's 5 s kill timeout
    to exit, its CPUs held from the next run in the same session). A flag lost without that word
    (its driver died) also ends the run for the actor, with a warning."""

    def __init__(self, flag: Any, on_run_over: Callable[[], None] | None = None) -> None:
        self.flag = flag
        self.stopped = False
        self.run_over = False
        self._on_run_over = on_run_over
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.flag is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        from ray.exceptions import RayActorError

        state = RUNNING
        while state != OVER:
            try:
                state = await self.flag.wait.remote(state)
            except RayActorError:
                log.warning("the run's stop flag was lost (its driver is gone): no new task starts here")
                self.stopped = True
                break
            except Exception as exc:  # a failing call, not a state: ask again, after a pause
                log.debug("waiting on the stop flag failed: %s", exc)
                await asyncio.sleep(RETRY_S)
                continue
            self.stopped = self.stopped or state != RUNNING
        else:  # heard the driver's word: say so, so that it can remove the flag
            with contextlib.suppress(Exception):
                self.flag.ack.remote()
        self.run_over = True
        if self._on_run_over is not None:
            with contextlib.suppress(Exception):
                self._on_run_over()


RETRY_S = 1.0
