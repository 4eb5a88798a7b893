"""What an annotator actor writes to the run's ledger, per task, as the write happens.

In a run, the lines go to the run's `LedgerSink`, one Ray actor on the driver's node that appends
them to `entries-sink.jsonl` in the run's directory: the annotators may run on any node, and the
ledger must be whole where `undo` will read it. An annotator sends its lines in groups (one call in
flight; the lines queued meanwhile go in the next) and waits for the group that holds a `b` line
before it sends the write. Without a sink (tests, the bench) each writer appends to a file of its
own (`entries-<pid>-<random>.jsonl`). Either way a line is one `os.write` on an `O_APPEND`
descriptor: no buffer in the process, so a run killed at any moment (SIGTERM, SIGKILL) leaves every
line that was acknowledged, and only the last one may be torn (readers skip it). Per task:

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

import asyncio
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEDGER_VERSION = 1
ENTRIES_GLOB = "entries-*.jsonl"
SINK_FILE = "entries-sink.jsonl"


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
    path: str  # the run's directory (its `run.json` and the entry files)
    sink: Any = field(default=None, compare=False, repr=False)  # the run's `LedgerSink` (a Ray actor)


def _sink_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_concurrency=1000)
    class LedgerSink:
        """The run's one writer of entries, on the driver's node (see the module's doc)."""

        def __init__(self, path: str) -> None:
            Path(path).mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(
                Path(path) / SINK_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
            )

        async def append(self, lines: bytes) -> None:
            assert self._fd is not None, "the run's ledger was closed"
            os.write(self._fd, lines)

        async def close(self) -> None:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    return LedgerSink


def open_sink(spec: LedgerSpec) -> LedgerSpec:
    """The run's ledger with its sink started on this (the driver's) node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    sink = _sink_class().options(scheduling_strategy=here).remote(spec.path)
    return LedgerSpec(run_id=spec.run_id, path=spec.path, sink=sink)


def close_sink(spec: LedgerSpec, timeout_s: float = 10.0) -> None:
    """At the run's end, when every annotator has reported: close the file, remove the actor."""
    import contextlib

    import ray

    if spec.sink is None:
        return
    with contextlib.suppress(Exception):
        ray.get(spec.sink.close.remote(), timeout=timeout_s)
    with contextlib.suppress(Exception):
        ray.kill(spec.sink)


def _dumps(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


class LedgerWriter:
    """One actor's entry file, opened on its first line (an actor that writes nothing leaves none)."""

    def __init__(self, spec: LedgerSpec):
        self.spec = spec
        self._fd: int | None = None
        self._pending: list[bytes] = []  # lines for the sink, not sent yet
        self._queued = 0  # lines for the sink so far
        self._sent = 0  # of those, sent (or lost with a failed call)
        self._sending: asyncio.Future[None] | None = None

    def _write(self, rec: dict[str, Any]) -> None:
        if self.spec.sink is not None:
            self._pending.append(_dumps(rec))
            self._queued += 1
            return
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

    async def flush(self) -> None:
        """Until every line written so far is on the sink's file (at once without a sink). Raises
        what the sink's call raised: a `b` line that is not recorded must stop its write."""
        target = self._queued
        while self._sent < target:
            if self._sending is None or self._sending.done():
                batch, self._pending = self._pending, []
                self._sending = asyncio.ensure_future(self._send(batch))
            await asyncio.shield(self._sending)

    async def _send(self, batch: list[bytes]) -> None:
        try:
            await self.spec.sink.append.remote(b"".join(batch))
        finally:
            self._sent += len(batch)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
