"""What an annotator actor writes to the run's ledger, per task, as the write happens.

Each actor appends to a file of its own (`entries-<pid>-<random>.jsonl`) with one `os.write` per
line on an `O_APPEND` descriptor: no buffer in the process, so a run killed at any moment (SIGTERM,
SIGKILL) leaves every line it wrote, and only the last one may be torn (readers skip it). Per task:

- a `b` line ("before") BEFORE the write is sent: what the task held (`before`), what the run
  writes (`wrote`) and its `digest`, and the workflow fields as read (`wf0`) when `on_success`
  may change them;
- a `w` line ("written") once the platform confirmed the write: what the write created where the
  platform makes new objects (Label Studio: the prediction's or annotation's id), and the workflow
  fields as the run left them (`wf`).

A `b` line without its `w` line is an unconfirmed write: undo compares the task with `digest` and
restores it only when it holds what the run wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_VERSION = 1
ENTRIES_GLOB = "entries-*.jsonl"


def canonical(data: Any) -> bytes:
    """The bytes a digest is taken of: sorted keys, no spaces; no data (None) is the empty object,
    which is what a platform that takes an object per task holds when it holds nothing."""
    return json.dumps({} if data is None else data, sort_keys=True, separators=(",", ":")).encode()


def digest(data: Any) -> str:
    """A 128-bit digest of task data: equal digests, equal data."""
    return hashlib.blake2b(canonical(data), digest_size=16).hexdigest()


@dataclass(frozen=True)
class LedgerSpec:
    """Where the run's ledger is: handed to every actor inside the run's spec (picklable)."""

    run_id: str
    path: str  # the run's directory (its `run.json` and the actors' entry files)


def _dumps(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


class LedgerWriter:
    """One actor's entry file, opened on its first line (an actor that writes nothing leaves none)."""

    def __init__(self, spec: LedgerSpec):
        self.spec = spec
        self._fd: int | None = None

    def _write(self, rec: dict[str, Any]) -> None:
        if self._fd is None:
            path = Path(self.spec.path)
            path.mkdir(parents=True, exist_ok=True)
            name = f"entries-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._fd, _dumps(rec))

    def before(
        self,
        task_id: int,
        before: Any,
        wrote: Any,
        *,
        writes_data: bool = True,
        workflow: dict[str, Any] | None = None,
    ) -> None:
        """Before the write is sent. `writes_data` False: only the workflow will change (the task
        already held this data)."""
        rec: dict[str, Any] = {"t": int(task_id), "e": "b", "at": round(time.time(), 3)}
        if writes_data:
            rec.update(before=before, wrote=wrote, digest=digest(wrote))
        if workflow is not None:
            rec["wf0"] = workflow
        self._write(rec)

    def written(
        self, task_id: int, *, created: dict[str, Any] | None = None, workflow: dict[str, Any] | None = None
    ) -> None:
        """After the platform confirmed the write (and the workflow action, when there was one)."""
        rec: dict[str, Any] = {"t": int(task_id), "e": "w"}
        if created:
            rec["created"] = created
        if workflow:
            rec["wf"] = workflow
        self._write(rec)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
