"""What a run gives back: `ToTaskResult`, with the Synapse action's field names, and its metrics.

The result is the one thing every caller reads (the CLI's table and exit code, a notebook, the
platform's job record), so the exit code is decided here and not by each caller.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 2
EXIT_STOPPED = 130  # as a shell reports a process ended by SIGINT


class RunStatus(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"  # a signal stopped it; every outcome up to the stop is counted


class TaskFailure(BaseModel):
    task_id: int
    error: str


class Metrics(BaseModel):
    """The guide's metrics categories; `stand_by` is what has not been processed yet."""

    total: int = 0
    success: int = 0
    failed: int = 0
    stand_by: int = 0
    empty: int = 0  # of `success`: written with no object (the model saw nothing), shown apart


class ToTaskResult(BaseModel):
    """What a run returns, with the Synapse action's field names.

    The `*_count` fields are filled from the per-status table (`pipeline/outcomes.COUNTS`), which names
    them; a person reads them in the columns of `COUNT_COLUMNS`.
    """

    status: RunStatus
    message: str
    total_tasks: int = 0
    success_count: int = 0
    failed_count: int = 0
    failures: list[TaskFailure] = Field(default_factory=list)
    metrics: Metrics = Field(default_factory=Metrics)
    skipped_count: int = 0
    unchanged_count: int = 0  # the platform already held exactly this data: not written again
    empty_count: int = 0  # of success_count: written with no object (an image the model saw nothing in)
    workflow_applied_count: int = 0
    workflow_failed_count: int = 0
    # Calls to the pre-processor sent again: after an infrastructure fault (a replica lost), and
    # after a full queue refused them (back-pressure); neither failed a task while its budget lasted.
    call_retries: int = 0
    call_backoffs: int = 0
    elapsed_s: float = 0.0
    # Where the tasks' time went, summed over them per stage (read, convert, model, write), and the
    # stage that bound the run: the one they spent most of it in (`run/progress.StageClock`).
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    bound_by: str | None = None
    # the run's ledger (`totask-ray undo LEDGER`): None for a dry run or --no-ledger
    run_id: str | None = None
    ledger: str | None = None

    def __getitem__(self, key: str) -> Any:
        """`result['status']`, as the Synapse action's dict result is read."""
        return getattr(self, key)

    @property
    def exit_code(self) -> int:
        """0 every task succeeded, 2 some failed, 1 the run failed (or every task failed), 130 stopped."""
        if self.status is RunStatus.STOPPED:
            return EXIT_STOPPED
        if self.status is RunStatus.FAILED:
            return EXIT_FAILED
        return EXIT_PARTIAL if self.failed_count else EXIT_OK


# The counts table a person reads (`console.print_result`), in its order: column, result attribute.
COUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("total", "metrics.total"),
    ("success", "success_count"),
    ("of which empty", "empty_count"),
    ("failed", "failed_count"),
    ("stand_by", "metrics.stand_by"),
    ("skipped", "skipped_count"),
    ("unchanged", "unchanged_count"),
)
