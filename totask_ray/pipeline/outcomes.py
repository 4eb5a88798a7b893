"""One record per task: the only thing that flows back from the workers to the driver.

Records travel as columns of a Ray Data batch (plain numpy arrays), so the driver can consume
them as they are produced without holding more than one batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class Status(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to do: policy `skip` and the task already holds data
    UNCHANGED = "unchanged"  # the platform already holds exactly this data: nothing was written
    EMPTY = "empty"  # written with no object (the model saw nothing): a success, counted apart
    STOPPED = "stopped"  # not started: the run was stopped first (never reported, left for a resume)


# What a resume does not do again: the task holds what this job would write.
DONE_STATUSES = frozenset({Status.SUCCESS, Status.SKIPPED, Status.UNCHANGED, Status.EMPTY})


class Stage(StrEnum):
    """Where a task's processing stopped; tells a user which part to fix."""

    FETCH = "fetch"  # reading the task and its data unit
    LOCATE = "locate"  # finding the primary / target file
    CONVERT = "convert"  # download + hook (file) or inference + hook
    VALIDATE = "validate"
    WRITE = "write"
    WORKFLOW = "workflow"  # the on_success action after a successful write
    DONE = "done"


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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["status"] = self.status.value
        d["stage"] = self.stage.value
        d.pop("extra")
        d.pop("critical")
        if not self.would_write:
            d.pop("would_write")
        else:
            d["would_write"] = json.loads(self.would_write)
        d.update(self.extra)
        return json.dumps(d, separators=(",", ":"))


def to_columns(outcomes: list[Outcome]) -> dict[str, np.ndarray]:
    return {
        "task_id": np.array([o.task_id for o in outcomes], dtype=np.int64),
        "status": np.array([o.status.value for o in outcomes], dtype=object),
        "stage": np.array([o.stage.value for o in outcomes], dtype=object),
        "error": np.array([o.error for o in outcomes], dtype=object),
        "critical": np.array([o.critical for o in outcomes], dtype=bool),
        "written": np.array([o.written for o in outcomes], dtype=bool),
        "workflow_error": np.array([o.workflow_error for o in outcomes], dtype=object),
        "workflow_applied": np.array([o.workflow_applied for o in outcomes], dtype=bool),
        "objects": np.array([o.objects for o in outcomes], dtype=np.int32),
        "duration_ms": np.array([o.duration_ms for o in outcomes], dtype=np.float32),
        "finished_at": np.array([o.finished_at for o in outcomes], dtype=np.float64),
        "node": np.array([o.node for o in outcomes], dtype=object),
        "would_write": np.array([o.would_write for o in outcomes], dtype=object),
    }


def from_columns(batch: dict[str, Any]) -> Iterator[Outcome]:
    n = len(batch["task_id"])
    for i in range(n):
        yield Outcome(
            task_id=int(batch["task_id"][i]),
            status=Status(str(batch["status"][i])),
            stage=Stage(str(batch["stage"][i])),
            error=str(batch["error"][i] or ""),
            critical=bool(batch["critical"][i]),
            written=bool(batch["written"][i]),
            workflow_error=str(batch["workflow_error"][i] or ""),
            workflow_applied=bool(batch["workflow_applied"][i]),
            objects=int(batch["objects"][i]),
            duration_ms=float(batch["duration_ms"][i]),
            finished_at=float(batch["finished_at"][i]),
            node=str(batch["node"][i] or ""),
            would_write=str(batch["would_write"][i] or ""),
        )


def read_report(path: str) -> Iterable[dict[str, Any]]:
    """The records of a `--report` file, skipping lines that are not records (a torn last line)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("task_id"), int):
                yield rec
