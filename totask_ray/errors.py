"""The two errors that end a run: `CriticalError` inside it, `ToTaskError` to its caller.

They live below everything that raises them (the steps, the methods, the pipeline) so that none of
those has to import the driver to stop a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from totask_ray.result import ToTaskResult


class CriticalError(RuntimeError):
    """Raised inside a step; the driver rolls back and re-raises it as `ToTaskError`."""


class ToTaskError(RuntimeError):
    """A critical error: the run stopped. `result` holds what was done before it stopped."""

    def __init__(self, message: str, result: ToTaskResult | None = None):
        super().__init__(message)
        self.result = result


class RunStopped(KeyboardInterrupt):
    """The run was stopped (SIGINT, SIGTERM, `ray job stop`, a notebook's interrupt) and finalized.

    A `KeyboardInterrupt`, so that a script that does not catch it ends as Ctrl-C ends it, and no
    `except Exception` in user code swallows a stop. `result` holds the counts at the stop: every
    task the platform holds a write of is in them and in the report.
    """

    def __init__(self, message: str, result: ToTaskResult | None = None):
        super().__init__(message)
        self.result = result

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "the run was stopped"
