"""A run-wide stop flag that the annotators and the id reads see within a fraction of a second.

A graceful stop must stop handing out work everywhere at once while the tasks already started
finish and report: the driver cannot reach into Ray Data's actors, so the flag is a tiny Ray actor
(no CPU) that the driver sets and every annotator polls in the background; the id reads check it
between pages, so a stopped run does not go on listing a million ids nobody will annotate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

STOP_POLL_S = 0.2


def _flag_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_concurrency=64)
    class StopFlag:
        def __init__(self) -> None:
            self._stopped = False

        def set(self) -> None:
            self._stopped = True

        def is_set(self) -> bool:
            return self._stopped

    return StopFlag


def create_flag() -> Any:
    """A new flag for one run (an actor handle: picklable, so it travels in the actors' settings)."""
    return _flag_class().remote()


def is_set(flag: Any, timeout_s: float = 5.0) -> bool:
    """Blocking check (the id reads); a flag that cannot be reached counts as not set."""
    import ray

    if flag is None:
        return False
    try:
        return bool(ray.get(flag.is_set.remote(), timeout=timeout_s))
    except Exception:
        return False


class StopWatch:
    """An annotator's view of the flag: `stopped` is refreshed in the background on its event loop.

    The flag also tells an actor that its run is over: the driver removes it once every outcome is
    in, and `on_run_over` is called then (an annotator lets go of what would keep it alive after
    Ray Data releases it: an actor holding a Serve handle otherwise takes Ray's 5 s kill timeout
    to exit, its CPUs held from the next run in the same session)."""

    def __init__(self, flag: Any, on_run_over: Callable[[], None] | None = None) -> None:
        self.flag = flag
        self.stopped = False
        self.run_over = False
        self._on_run_over = on_run_over
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.flag is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        from ray.exceptions import RayActorError

        while not self.run_over:
            try:  # once stopped, stopped for good: the polls go on only to hear of the run's end
                self.stopped = bool(await self.flag.is_set.remote()) or self.stopped
            except RayActorError:  # the flag is gone: removed at the run's end, or with its driver
                self.run_over = True
                if self._on_run_over is not None:
                    with contextlib.suppress(Exception):
                        self._on_run_over()
                return
            except Exception:  # a slow or failing call: try again at the next poll
                pass
            await asyncio.sleep(STOP_POLL_S)
