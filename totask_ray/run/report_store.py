"""Where a run's `--report` lives, and what `--resume` reads: a local file, or an object store.

A local path is opened and appended to as it always was. A URI (``s3://bucket/key``, or any URI
``pyarrow.fs.FileSystem.from_uri`` resolves, else fsspec) is an object store, which has no append,
so the report there is kept as objects that are each written whole (a PUT is all or nothing):

- ``U.parts/<generation>/<seq>.jsonl``: what the run flushed while it went, one part every
  `EVERY_S` seconds or `EVERY_LINES` outcomes, whichever comes first, and the rest when it closes.
  A run's first part (seq 0) is what it carried from the report it resumed from.
- ``U`` itself: the whole report, composed from the run's parts when the run closes it (at its end,
  on a critical error, or after a SIGINT/SIGTERM has let the tasks in flight report); the parts are
  deleted after it.

A reader reads ``U``, then every part in name order (older generations first), so whatever moment
a run was killed at, what it had flushed is there to resume from: a SIGKILL loses at most the
outcomes since its last part, whose tasks the resume runs again and finds already written
(``unchanged``: each write compares before it writes). Between composing ``U`` and deleting the parts
a record may be read twice; the done ids are made unique, and a carry keeps each task's first done
record, so a report never grows duplicates. A new run at ``U`` first removes what an earlier run left
there (a local file is truncated), except when it resumes from ``U`` itself: then it writes what it
carries before it removes the old objects, so a kill in between leaves both, never neither.

Credentials come from the environment, as every AWS tool reads them (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE, and AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL for an S3-compatible server, which pyarrow's S3 filesystem reads itself), never from
the job file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from totask_ray.errors import CriticalError
from totask_ray.net.object_store import (
    StoreOpenError,
    is_object_uri,
    open_filesystem,
    put_object,
    store_hint,
)
from totask_ray.net.redact import redact_url, safe_error
from totask_ray.pipeline.outcomes import DONE_STATUSES, read_report, report_records
from totask_ray.run.progress import IdSet

log = logging.getLogger("totask_ray")

Location = str | os.PathLike[str]

EVERY_S = 10.0  # a part at least this often while outcomes come: what a SIGKILL may lose
EVERY_LINES = 10_000  # and at most this many outcomes a part
_CHUNK = 1 << 20


def local_path(location: Location) -> Path:
    text = os.fspath(location)
    if text.lower().startswith("file://"):
        from pyarrow.fs import FileSystem

        return Path(FileSystem.from_uri(text)[1])
    return Path(text)


def local_report(location: Location | None) -> Path | None:
    """The report's path when it is a local file; None for none, or one on an object store."""
    if location is None or is_object_uri(location):
        return None
    return local_path(location)


@dataclass(frozen=True)
class ObjectReport:
    """A report at a URI: its filesystem and object path, and the operations a report needs."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem
    path: str

    @property
    def shown(self) -> str:
        return redact_url(self.uri)

    @property
    def parts_dir(self) -> str:
        return f"{self.path}.parts"

    def same_as(self, other: ObjectReport) -> bool:
        return self.path == other.path and self.fs.equals(other.fs)

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """A storage error as a `CriticalError` that says what failed and where to look."""
        try:
            yield
        except (OSError, ValueError) as exc:
            raise CriticalError(
                f"Cannot {doing} the report at {self.shown}: {safe_error(exc)}{self.hint}"
            ) from None

    @property
    def hint(self) -> str:
        return store_hint(self.fs)

    def _files(self, under: str) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        infos = self.fs.get_file_info(FileSelector(under, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == FileType.File and i.path.endswith(".jsonl"))

    def parts(self, generation: str | None = None) -> list[str]:
        """The part objects in name order: every generation's, or one's."""
        under = self.parts_dir if generation is None else f"{self.parts_dir}/{generation}"
        return self._files(under)

    def has_base(self) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.path).type == FileType.File

    def exists(self) -> bool:
        with self.errors("read"):
            return self.has_base() or bool(self.parts())

    def lines(self) -> Iterator[str]:
        """Every line of the report: the composed object, then the parts in name order."""
        with self.errors("read"):
            sources = ([self.path] if self.has_base() else []) + self.parts()
            for source in sources:
                with self.fs.open_input_stream(source) as raw:
                    yield from io.TextIOWrapper(raw, encoding="utf-8")

    def put(self, path: str, chunks: Iterable[bytes]) -> int:
        """Write one object whole from `chunks`; its size (0: nothing came, nothing was written)."""
        return put_object(self.fs, path, chunks)

    def delete_parts(self, keep: str | None = None) -> None:
        """Every part object, or every one but generation `keep`'s."""
        from pyarrow.fs import FileSelector, FileType

        infos = self.fs.get_file_info(FileSelector(self.parts_dir, allow_not_found=True))
        for info in infos:
            if info.type == FileType.Directory and info.base_name != keep:
                self.fs.delete_dir(info.path)
            elif info.type == FileType.File:
                self.fs.delete_file(info.path)
        if keep is None and self.fs.get_file_info(self.parts_dir).type == FileType.Directory:
            self.fs.delete_dir(self.parts_dir)


def resolve(uri: str) -> ObjectReport:
    """The filesystem for `uri` (`net/object_store.py`): pyarrow's own, else fsspec's."""
    try:
        fs, path = open_filesystem(uri)
    except StoreOpenError as exc:
        raise CriticalError(f"Cannot open the report at {redact_url(uri)}: {exc}") from None
    return ObjectReport(uri, fs, path)


def report_exists(location: Location) -> bool:
    if is_object_uri(location):
        return resolve(os.fspath(location)).exists()
    return local_path(location).exists()


def read_records(location: Location) -> Iterator[dict[str, Any]]:
    """Every record of the report at `location` (skipping lines that are not records)."""
    if is_object_uri(location):
        yield from report_records(resolve(os.fspath(location)).lines())
    else:
        yield from read_report(str(local_path(location)))


def done_records(location: Location) -> Iterator[dict[str, Any]]:
    """The records of the tasks a report finished (what a resume skips and its report carries);
    from objects, each task's first such record only (see the module's note on duplicates)."""
    records = (r for r in read_records(location) if r.get("status") in DONE_STATUSES)
    if not is_object_uri(location):
        yield from records
        return
    seen = IdSet()
    for rec in records:
        if seen.add(rec["task_id"]):
            yield rec


def _line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, separators=(",", ":")) + "\n"


def open_report(
    location: Location,
    carry_from: Location | None = None,
    *,
    every_s: float = EVERY_S,
    every_lines: int = EVERY_LINES,
) -> IO[str]:
    """The report, open for appending; a resumed run's report starts with what the earlier one
    finished (success, skipped, unchanged), so resuming from the latest report is always right.

    On disk the carried lines are written to a temporary file that replaces the report only when
    whole, so a resume into the same path as its earlier report never loses it; on an object store
    see the module's note.
    """
    carry = carry_from if carry_from is not None and report_exists(carry_from) else None
    if is_object_uri(location):
        return cast("IO[str]", _open_objects(resolve(os.fspath(location)), carry, every_s, every_lines))
    path = local_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    if carry is not None:
        tmp = path.with_name(f".{path.name}.carry")
        with open(tmp, "w", encoding="utf-8") as out:
            for rec in done_records(carry):
                out.write(_line(rec))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return open(path, "a", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def _open_objects(
    store: ObjectReport, carry: Location | None, every_s: float, every_lines: int
) -> ObjectReportWriter:
    generation = f"{time.time_ns():020d}-{os.getpid()}"
    writer = ObjectReportWriter(store, generation, every_s=every_s, every_lines=every_lines)
    in_place = carry is not None and is_object_uri(carry) and resolve(os.fspath(carry)).same_as(store)
    with store.errors("write"):
        # The report's object starts empty, as `open(path, "w")` leaves a file: it also proves now,
        # not at the first part, that the run may write there.
        if not in_place:  # what an earlier run left here goes first: none of it may be read as done
            store.put(store.path, [b""])
            store.delete_parts()
        if carry is not None:
            writer.carry(done_records(carry))
        if in_place:  # what was carried is written: only now the objects it came from may go
            store.delete_parts(keep=generation)
            store.put(store.path, [b""])
    writer.start()
    return writer


class ObjectReportWriter(io.TextIOBase):
    """The report on an object store while a run writes it: lines buffered, flushed as part objects
    (every `every_s` seconds while any are pending, from a timer thread too, so a quiet spell does
    not hold them back; every `every_lines` lines), composed into the report's object at `close`.

    The tracker writes, flushes (after each batch) and closes it: that is all of a file it uses.
    """

    def __init__(self, store: ObjectReport, generation: str, *, every_s: float, every_lines: int):
        super().__init__()
        self.store = store
        self.generation = generation
        self.every_s = every_s
        self.every_lines = every_lines
        self.parts_written = 0
        self._pending: list[str] = []
        self._pending_lines = 0
        self._buffer_lock = threading.Lock()  # the pending lines (the tracker's thread, the timer)
        self._upload_lock = threading.Lock()  # one part at a time, so the parts keep their order
        self._last = time.monotonic()
        self._failing = False
        self._stop = threading.Event()
        self._started = False  # set up and handed out: only then does `close` compose the report
        self._timer = threading.Thread(target=self._tick, name="totask-report-parts", daemon=True)

    def _part(self, seq: int) -> str:
        return f"{self.store.parts_dir}/{self.generation}/{seq:08d}.jsonl"

    def carry(self, records: Iterable[dict[str, Any]]) -> None:
        """The earlier report's finished records, as this run's first part (streamed, not held)."""

        def chunks() -> Iterator[bytes]:
            block: list[str] = []
            size = 0
            for rec in records:
                line = _line(rec)
                block.append(line)
                size += len(line)
                if size >= _CHUNK:
                    yield "".join(block).encode()
                    block, size = [], 0
            if block:
                yield "".join(block).encode()

        if self.store.put(self._part(self.parts_written), chunks()):
            self.parts_written += 1

    def start(self) -> None:
        self._started = True
        self._timer.start()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._buffer_lock:
            self._pending.append(s)
            self._pending_lines += s.count("\n")
            full = self._pending_lines >= self.every_lines
        if full:
            self._upload(raise_errors=False)
        return len(s)

    def _due(self) -> bool:
        with self._buffer_lock:
            return bool(self._pending) and time.monotonic() - self._last >= self.every_s

    def flush(self) -> None:
        """A part when one is due (the tracker flushes after every batch: not a PUT each time)."""
        if not self.closed and self._due():
            self._upload(raise_errors=False)

    def _tick(self) -> None:
        while not self._stop.wait(max(self.every_s / 2, 0.05)):
            if self._due():
                self._upload(raise_errors=False)

    def _upload(self, *, raise_errors: bool) -> None:
        with self._upload_lock:
            with self._buffer_lock:
                data, lines = "".join(self._pending), self._pending_lines
                self._pending, self._pending_lines = [], 0
            if not data:
                return
            try:
                with self.store.errors("write"):
                    self.store.put(self._part(self.parts_written), [data.encode()])
            except CriticalError as exc:
                with self._buffer_lock:  # kept, in order, for the next try
                    self._pending.insert(0, data)
                    self._pending_lines += lines
                if raise_errors:
                    raise
                if not self._failing:
                    log.warning("%s (kept, tried again in %g s)", exc, self.every_s)
                self._failing = True
                return
            finally:
                self._last = time.monotonic()
            if self._failing:
                log.info("the report's parts are written again to %s", self.store.shown)
            self._failing = False
            self.parts_written += 1

    def close(self) -> None:
        """The last part, then the report's object composed from this run's parts, which then go.

        A failure here is logged (the driver's cleanups do not show it) and raised; whatever parts
        were written stay, and a resume from the same URI reads them."""
        if self.closed:
            return
        if not self._started:  # its setup failed (and said so): nothing to compose
            super().close()
            return
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join()
        try:
            self._upload(raise_errors=True)
            with self.store.errors("compose"):
                parts = self.store.parts(self.generation)
                self.store.put(self.store.path, _read_all(self.store, parts) if parts else [b""])
                self.store.delete_parts()
        except CriticalError as exc:
            log.error("%s; the parts written so far stay under %s.parts/", exc, self.store.shown)
            raise
        finally:
            super().close()


def _read_all(store: ObjectReport, paths: list[str]) -> Iterator[bytes]:
    for path in paths:
        with store.fs.open_input_stream(path) as src:
            while chunk := src.read(_CHUNK):
                yield chunk
