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

On an object store (`--report s3://...`: no append there) the sink does not write: it gathers the
lines that come while a part is being written (group commit), and the driver (`PartUploader`, the
one process with the store's credentials, as for the report) takes each group and writes it as one
whole object `parts/sink-<seq>.jsonl`; only then are the group's callers answered. So a line is
acknowledged only once its part is on the store, and a SIGKILL at any moment leaves every `b` line
whose write was sent. At the run's end the parts are composed into `entries-sink.jsonl` and deleted
(a kill in between leaves both: readers merge a task's lines, so reading a line twice is harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from totask_ray.ledger.place import ENTRIES_GLOB, PARTS_DIR, LedgerError, is_object_uri, open_place

__all__ = ["ENTRIES_GLOB"]
log = logging.getLogger("totask_ray")

LEDGER_VERSION = 1
SINK_FILE = "entries-sink.jsonl"
UPLOADERS = 4  # parts written at once: a group waits for at most one part's PUT before it goes


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


class _Group:
    """Lines that go in one part, and the answer their callers wait for."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def _sink_class() -> Any:
    import ray

    @ray.remote(num_cpus=0, max_concurrency=1000)
    class LedgerSink:
        """The run's one writer of entries, on the driver's node (see the module's doc)."""

        def __init__(self, path: str) -> None:
            self._fd: int | None = None
            self._closed = False
            self._open: _Group | None = None  # object store: the group being gathered
            self._taken: dict[int, _Group] = {}  # and those a part is being written for
            self._ids = itertools.count()
            self._ready = asyncio.Event()
            if not is_object_uri(path):
                Path(path).mkdir(parents=True, exist_ok=True)
                self._fd = os.open(Path(path) / SINK_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        async def append(self, lines: bytes) -> None:
            if self._closed:
                raise LedgerError("the run's ledger was closed")
            if self._fd is not None:
                os.write(self._fd, lines)
                return
            if self._open is None:
                self._open = _Group()
            group = self._open
            group.lines.append(lines)
            self._ready.set()
            await asyncio.shield(group.done)  # until its part is on the store (or failed: raised)

        async def take(self, wait_s: float) -> tuple[int, bytes] | None:
            """The group gathered so far (waiting up to `wait_s` for one), for the driver to write."""
            deadline = time.monotonic() + wait_s
            while self._open is None:
                self._ready.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), left)
            group, self._open = self._open, None
            gid = next(self._ids)
            self._taken[gid] = group
            return gid, b"".join(group.lines)

        async def written(self, gid: int, error: str | None = None) -> None:
            """The group's part is on the store (or could not be written: its callers get `error`)."""
            group = self._taken.pop(gid)
            if error is None:
                group.done.set_result(None)
            else:
                group.done.set_exception(LedgerError(error))

        async def close(self) -> None:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    return LedgerSink


class PartUploader:
    """On the driver: writes each group of lines the sink gathered as one part object, then tells
    the sink (which answers the group's callers). `UPLOADERS` threads, so a group waits for at
    most one PUT before it goes; the parts' order does not matter (readers merge by task)."""

    def __init__(self, sink: Any, run_path: str, threads: int = UPLOADERS):
        self.sink = sink
        self.place = open_place(run_path)
        self.parts = 0  # part objects written
        # what the parts hold, also spooled on the driver's disk: `compose` puts it as one object
        # without reading the parts back (a long run writes thousands)
        self._spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by `compose`
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"totask-ledger-parts-{i}", daemon=True)
            for i in range(threads)
        ]
        self._failing = False

    def start(self) -> PartUploader:
        for t in self._threads:
            t.start()
        return self

    def _loop(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                got = ray.get(self.sink.take.remote(0.5))
            except Exception:  # the sink is gone (the run ended or Ray went): nothing left to take
                return
            if got is not None:
                self._write(*got)

    def _write(self, gid: int, data: bytes) -> None:
        name = f"{PARTS_DIR}/sink-{next(self._seq):08d}.jsonl"
        error = None
        try:
            self.place.put(name, data)
        except LedgerError as exc:
            error = str(exc)
            if not self._failing:
                log.warning("%s: the tasks it held are not written", exc)
            self._failing = True
        else:
            self._failing = False
            with self._lock:
                self.parts += 1
                self._spool.write(data)
        self.sink.written.remote(gid, error)

    def close(self, timeout_s: float) -> None:
        """Every group taken and written, then the parts composed into `entries-sink.jsonl`."""
        import ray

        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
        with contextlib.suppress(Exception):  # what came after the threads' last take
            while (got := ray.get(self.sink.take.remote(0.0), timeout=timeout_s)) is not None:
                self._write(*got)
        self.compose()

    def compose(self) -> None:
        """The run's parts as one object, then the parts deleted (a kill in between leaves both)."""
        from totask_ray.net.object_store import put_object

        place, spool = self.place, self._spool
        try:
            if not self.parts:
                return
            spool.seek(0)
            with place.errors("compose"):
                size = put_object(
                    place.fs, f"{place.path}/{SINK_FILE}", iter(lambda: spool.read(1 << 20), b"")
                )
            with place.errors("clean up"):
                place.fs.delete_dir(f"{place.path}/{PARTS_DIR}")  # batched deletes on S3
        except LedgerError as exc:
            log.warning("%s; its parts stay, and undo reads them", exc)
            return
        finally:
            spool.close()
        log.info("the run's ledger: %d parts composed into %s (%d bytes)", self.parts, SINK_FILE, size)


_UPLOADERS: dict[str, PartUploader] = {}  # run id -> the driver's uploader of that run's parts


def open_sink(spec: LedgerSpec) -> LedgerSpec:
    """The run's ledger with its sink started on this (the driver's) node, and on an object store
    the driver's part writer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    sink = _sink_class().options(scheduling_strategy=here).remote(spec.path)
    if is_object_uri(spec.path):
        _UPLOADERS[spec.run_id] = PartUploader(sink, spec.path).start()
    return LedgerSpec(run_id=spec.run_id, path=spec.path, sink=sink)


def close_sink(spec: LedgerSpec, timeout_s: float = 10.0) -> None:
    """At the run's end, when every annotator has reported: the last parts written and composed
    (object store), the file closed, the actor removed."""
    import ray

    if spec.sink is None:
        return
    uploader = _UPLOADERS.pop(spec.run_id, None)
    if uploader is not None:
        uploader.close(timeout_s)
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
        self._place: Any = None  # an object store without a sink: where this writer's parts go
        self._name = ""
        self._parts = 0

    def _write(self, rec: dict[str, Any]) -> None:
        if self.spec.sink is not None or is_object_uri(self.spec.path):  # sent (or put) at `flush`
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
        if self.spec.sink is None:  # an object store without a sink: one part per flush, here
            self._put_part()
            return
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

    def _put_part(self) -> None:
        if not self._pending:
            return
        if self._place is None:
            self._place = open_place(self.spec.path)
            self._name = f"{PARTS_DIR}/{os.getpid()}-{uuid.uuid4().hex[:8]}"
        batch, self._pending = self._pending, []
        self._place.put(f"{self._name}-{self._parts:06d}.jsonl", b"".join(batch))
        self._parts += 1

    def close(self) -> None:
        if self.spec.sink is None and is_object_uri(self.spec.path):
            self._put_part()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
