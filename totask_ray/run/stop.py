"""Stopping a run gracefully: a first SIGINT or SIGTERM stops new tasks, a second stops at once.

`ray job stop` sends SIGTERM (then SIGKILL after `RAY_JOB_STOP_WAIT_TIME_S`, 3 s by default), a
terminal's Ctrl-C and a notebook's interrupt send SIGINT. Killing the pipeline there and then
would lose the outcomes of tasks whose writes already landed (outcomes travel back with their
batch), so the first signal only sets the run's stop flag: the actors finish what they started and
report it, nothing new starts, and the driver records every outcome before it finalizes. If what is
in flight has not finished within `timeout_s`, or a second signal comes, the driver stops waiting.

The handler itself only records the signal: logging and Ray calls happen on a watcher thread
(a handler runs between two bytecodes of whatever the main thread was doing, locks held).
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

from totask_ray.pipeline.stop import create_flag, finish

log = logging.getLogger("totask_ray")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """While inside: SIGINT and SIGTERM set the run's stop flag instead of killing the driver."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.flag: Any = None
        self.reason: str | None = None  # the first signal's name, once one came
        self.signalled_at: float | None = None
        self.cut = False  # the bound ran out (or a second signal came) before everything reported
        self._signalled = threading.Event()
        self._finished = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        self.flag = create_flag()
        if threading.current_thread() is threading.main_thread():  # signal.signal's own rule
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        threading.Thread(target=self._watch, name="totask-stop", daemon=True).start()
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is not None:
            self.cut = True
            raise KeyboardInterrupt  # the second signal: stop waiting now
        self.reason = signal.Signals(signum).name
        self.signalled_at = time.monotonic()
        self._signalled.set()

    def _watch(self) -> None:
        self._signalled.wait()
        if self._finished.is_set():
            return
        log.warning(
            "%s: stopping: no new task starts; waiting up to %g s for the tasks in flight to finish "
            "and report (a second signal stops at once)",
            self.reason,
            self.timeout_s,
        )
        try:
            self.flag.set.remote()
        except Exception as exc:  # Ray already gone: the driver's own wait below still bounds the stop
            log.debug("could not set the stop flag: %s", exc)
        if not self._finished.wait(self.timeout_s):
            log.warning("the tasks in flight did not all report within %g s: stopping now", self.timeout_s)
            _thread.interrupt_main(signal.SIGINT)  # the handler's second-signal path

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._finished.set()
        self._signalled.set()  # let the watcher end
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.flag is not None:
            finish(self.flag)  # every annotator hears the run is over; then the flag is removed
