"""One record per task: the only thing that flows back from the workers to the driver.

Records travel as columns of a Ray Data batch (plain numpy arrays), so the driver can consume
them as they are produced without holding more than one batch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from typing import Any, Literal

import numpy as np

from totask_ray.result import Metrics, ToTaskResult


class Status(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to do: policy `skip` and the task already holds data
    UNCHANGED = "unchanged"  # the platform already holds exactly this data: nothing was written
    EMPTY = "empty"  # written with no object (the model saw nothing): a success, counted apart
    STOPPED = "stopped"  # not started: the run was stopped first (never reported, left for a resume)


@dataclass(frozen=True)
class Counts:
    """What a task that ended with a status counts as, wherever a run counts tasks: the tracker's
    metrics, progress and events (`run/progress.py`), the result and its message (`run/steps.py`)."""

    # The `Metrics` fields it adds to; the first ("success" or "failed", the SDK's categories) is also
    # the status of its task event. Empty: never started, so neither counted nor reported (stand_by).
    metrics: tuple[str, ...]
    result: tuple[str, ...] = ()  # the `ToTaskResult` count fields it adds to
    done: bool = False  # the task holds what this job would write: a resume does not do it again
    workflow: bool = False  # the on_success action followed it: its outcome is counted
    note: str | None = None  # its task event's note, what a bare "success" hides ({error}: the outcome's)
    summary: str | None = None  # the result message's phrase after the succeeded / failed counts ({n})

    @property
    def event(self) -> str:
        """The SDK's category, "success" or "failed": the status of its task event."""
        return self.metrics[0]


# Every status, in Status's order (the order of their phrases in the result's message).
COUNTS: dict[Status, Counts] = {
    Status.SUCCESS: Counts(("success",), ("success_count",), done=True, workflow=True),
    Status.FAILED: Counts(("failed",), ("failed_count",)),
    # Skipped and unchanged tasks were processed and needed nothing: successes of the step.
    Status.SKIPPED: Counts(
        ("success",), ("skipped_count",), done=True, note="skipped: {error}", summary="{n} skipped"
    ),
    Status.UNCHANGED: Counts(
        ("success",),
        ("unchanged_count",),
        done=True,
        workflow=True,
        note="unchanged: the task already held exactly this data, nothing was written",
        summary="{n} already held this data (not written again)",
    ),
    Status.EMPTY: Counts(
        ("success", "empty"),
        ("success_count", "empty_count"),
        done=True,
        workflow=True,
        note="empty: written with no object",
    ),
    Status.STOPPED: Counts(()),
}
assert list(COUNTS) == list(Status), "every status says what it counts as, in Status's order"
assert {n for c in COUNTS.values() for n in c.metrics} <= set(Metrics.model_fields)
assert {n for c in COUNTS.values() for n in c.result} <= set(ToTaskResult.model_fields)

# What a resume does not do again: the task holds what this job would write.
DONE_STATUSES = frozenset(s for s, c in COUNTS.items() if c.done)


def totals(counts: Mapping[Status, int], of: Literal["metrics", "result"]) -> Counter[str]:
    """What per-status counts add up to in each of the fields their `Counts.<of>` name ("metrics"
    or "result"); a field no status reached is 0."""
    out: Counter[str] = Counter()
    for status, n in counts.items():
        for name in getattr(COUNTS[status], of):
            out[name] += n
    return out


class Stage(StrEnum):
    """Where a task's processing stopped; tells a user which part to fix."""

    FETCH = "fetch"  # reading the task and its data unit
    LOCATE = "locate"  # finding the primary / target file
    CONVERT = "convert"  # download + hook (file) or inference + hook
    VALIDATE = "validate"
    WRITE = "write"
    WORKFLOW = "workflow"  # the on_success action after a successful write
    DONE = "done"


# The stages a task's time is split into (a stage's name: its Outcome field), in a task's order.
STAGE_TIMES: dict[str, str] = {
    "read": "read_ms",
    "convert": "convert_ms",
    "model": "model_ms",
    "write": "write_ms",
}


@dataclass
class Outcome:
    task_id: int
    status: Status
    stage: Stage = Stage.DONE
    error: str = ""
    # A critical outcome (e.g. the token was refused) stops the whole run, not just this task.
    critical: bool = False
    written: bool = False
    workflow_error: str = ""
    workflow_applied: bool = False  # the on_success action changed the task (it was not there yet)
    objects: int = 0
    duration_ms: float = 0.0
    finished_at: float = 0.0  # unix time: lets a report be plotted as throughput over the run
    node: str = ""
    would_write: str = ""  # JSON of the payload, in dry-run mode only
    # The pre-processor call behind this task, on the first task of each call only (so they add up):
    # tries sent again after an infrastructure fault, and after a full queue's refusal.
    retries: int = 0
    backoffs: int = 0
    # Where the task's time went, in ms (`STAGE_TIMES`): reading it, converting (downloads, decode,
    # hooks, validation: the rest of its time), waiting on the model's call, writing (and on_success).
    # They let the run name the stage that bound it (`run/progress.StageClock`).
    read_ms: float = 0.0
    convert_ms: float = 0.0
    model_ms: float = 0.0
    write_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["status"] = self.status.value
        d["stage"] = self.stage.value
        d.pop("extra")
        d.pop("critical")
        for quiet in ("retries", "backoffs"):  # most tasks: none, and nothing said
            if not d[quiet]:
                d.pop(quiet)
        for ms in STAGE_TIMES.values():  # a stage the task never reached says nothing
            if d[ms]:
                d[ms] = round(d[ms], 1)
            else:
                d.pop(ms)
        if not self.would_write:
            d.pop("would_write")
        else:
            d["would_write"] = json.loads(self.would_write)
        d.update(self.extra)
        return json.dumps(d, separators=(",", ":"))


# How each field travels in a batch column, in the order of Outcome's fields (every field but
# `extra`, which only the report carries): numpy dtype, and what turns a cell back into the value.
_COLUMNS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "task_id": (np.int64, int),
    "status": (object, Status),
    "stage": (object, Stage),
    "error": (object, lambda v: v or ""),
    "critical": (bool, bool),
    "written": (bool, bool),
    "workflow_error": (object, lambda v: v or ""),
    "workflow_applied": (bool, bool),
    "objects": (np.int32, int),
    "duration_ms": (np.float32, float),
    "finished_at": (np.float64, float),
    "node": (object, lambda v: v or ""),
    "would_write": (object, lambda v: v or ""),
    "retries": (np.int32, int),
    "backoffs": (np.int32, int),
    "read_ms": (np.float32, float),
    "convert_ms": (np.float32, float),
    "model_ms": (np.float32, float),
    "write_ms": (np.float32, float),
}
assert list(_COLUMNS) == [f.name for f in fields(Outcome)][:-1], "Outcome's fields and their columns differ"


def to_columns(outcomes: list[Outcome]) -> dict[str, np.ndarray]:
    columns = {}
    for name, (dtype, _) in _COLUMNS.items():
        values = list(map(attrgetter(name), outcomes))
        if name in ("status", "stage"):
            values = [v.value for v in values]
        columns[name] = np.array(values, dtype=dtype)
    return columns


def from_columns(batch: dict[str, Any]) -> Iterator[Outcome]:
    # Column by column (tolist() gives Python values at C speed), then one positional constructor call
    # per row: the driver does this for every task of the run.
    columns = [map(back, batch[name].tolist()) for name, (_, back) in _COLUMNS.items()]
    for values in zip(*columns, strict=True):
        yield Outcome(*values)


def read_report(path: str) -> Iterable[dict[str, Any]]:
    """The records of a `--report` file, skipping lines that are not records (a torn last line)."""
    with open(path, encoding="utf-8") as f:
        yield from report_records(f)


def report_records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The records among a report's lines (a file's, or an object's in `run/report_store.py`)."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("task_id"), int):
            yield rec
