"""Where a ledger lives: a local directory, or a prefix on an object store (wherever `--report` can
go). One seam, so the ledger's readers and writers have one code path: a `Place` is a pyarrow
filesystem (the local one for a directory) and a directory on it.

A location is given as the user gave it: a `Path` (or a plain path) for a local directory, a URI
string (``s3://bucket/x.jsonl.ledger/<run id>``) for an object store. Children keep that form
(`join`), so what a command prints can be pasted into the next one.

On an object store a run's entries are part objects under ``<run>/parts/``, each written whole
while the run goes, composed into ``<run>/entries-sink.jsonl`` when it closes (`record.py`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from totask_ray.net.object_store import (
    StoreOpenError,
    describe,
    is_object_uri,
    open_filesystem,
    put_object,
    store_hint,
)
from totask_ray.net.redact import safe_error

Where = str | os.PathLike[str]
Location = Path | str  # a local directory, or a URI on an object store

ENTRIES_GLOB = "entries-*.jsonl"  # top-level entry files (a sink's, or a writer's without a sink)
PARTS_DIR = "parts"  # on an object store: the entries written as whole objects while a run goes


class LedgerError(Exception):
    """A ledger that cannot be used; the message says which path and what to give instead."""


def location(where: Where) -> Location:
    """A URI stays a string (a `Path` would fold its ``//``); anything else is a local `Path`."""
    text = os.fspath(where)
    if text.lower().startswith("file://"):
        from pyarrow.fs import FileSystem

        return Path(FileSystem.from_uri(text)[1])
    return text if is_object_uri(text) else Path(text)


def join(where: Where, name: str) -> Location:
    loc = location(where)
    return loc / name if isinstance(loc, Path) else f"{loc.rstrip('/')}/{name}"


def name_of(where: Where) -> str:
    loc = location(where)
    return loc.name if isinstance(loc, Path) else loc.rstrip("/").rsplit("/", 1)[-1]


def shown(where: Where) -> str:
    """The location as a message may show it (a URI without credentials or query)."""
    return describe(location(where))


@dataclass(frozen=True)
class Place:
    """A directory on a filesystem: what the ledger reads and writes there."""

    fs: Any  # pyarrow.fs.FileSystem
    path: str  # the directory, on `fs`
    where: Location

    @property
    def remote(self) -> bool:
        return isinstance(self.where, str)

    @property
    def shown(self) -> str:
        return shown(self.where)

    def _p(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """A storage error as a `LedgerError` that says what failed, where, and what to check."""
        try:
            yield
        except (OSError, ValueError) as exc:
            hint = store_hint(self.fs) if self.remote else ""
            raise LedgerError(f"Cannot {doing} the ledger at {self.shown}: {safe_error(exc)}{hint}") from None

    def is_file(self, name: str) -> bool:
        from pyarrow.fs import FileType

        with self.errors("read"):
            return bool(self.fs.get_file_info(self._p(name)).type == FileType.File)

    def read_bytes(self, name: str) -> bytes:
        with self.errors("read"), self.fs.open_input_stream(self._p(name)) as src:
            return bytes(src.read())

    def subdirs(self) -> list[str]:
        """The names of the directories (prefixes) right under this one, sorted."""
        from pyarrow.fs import FileSelector, FileType

        with self.errors("list"):
            infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == FileType.Directory)

    def entry_files(self) -> list[tuple[str, int]]:
        """The entry objects (path on `fs`, size): the top-level `entries-*.jsonl`, then the parts a
        run on an object store wrote while it went, in name order."""
        from pyarrow.fs import FileSelector, FileType

        with self.errors("list"):
            infos = self.fs.get_file_info(FileSelector(self.path, recursive=True, allow_not_found=True))
        top, parts = [], []
        base = self.path.rstrip("/") + "/"
        for i in infos:
            if i.type != FileType.File or not i.path.startswith(base):
                continue
            rel = i.path[len(base) :]
            if "/" not in rel and fnmatch.fnmatch(rel, ENTRIES_GLOB):
                top.append((i.path, i.size))
            elif rel.startswith(PARTS_DIR + "/") and rel.endswith(".jsonl"):
                parts.append((i.path, i.size))
        return sorted(top) + sorted(parts)

    def lines(self, path: str) -> Iterator[str]:
        with self.errors("read"), self.fs.open_input_stream(path) as raw:
            yield from io.TextIOWrapper(raw, encoding="utf-8")

    def put(self, name: str, data: bytes) -> None:
        """One object (a file) written whole: a reader sees all of it or none."""
        with self.errors("write"):
            put_object(self.fs, self._p(name), [data])

    def text_writer(self, name: str) -> IO[str]:
        """A text file written as it goes on a disk; on an object store, one object at close."""
        if not self.remote:
            Path(self._p(name)).parent.mkdir(parents=True, exist_ok=True)
            return open(self._p(name), "w", encoding="utf-8")
        return _ObjectText(self, name)


class _ObjectText(io.StringIO):
    """Lines kept in memory, put as one object when closed (an object store has no append)."""

    def __init__(self, place: Place, name: str):
        super().__init__()
        self._place, self._name = place, name

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue().encode()
            super().close()
            self._place.put(self._name, data)


def open_place(where: Where) -> Place:
    """The filesystem and directory for a location; a URI's store is resolved from the environment."""
    loc = location(where)
    if isinstance(loc, Path):
        from pyarrow.fs import LocalFileSystem

        return Place(LocalFileSystem(), str(loc.absolute()), loc)
    try:
        fs, path = open_filesystem(loc)
    except StoreOpenError as exc:
        raise LedgerError(f"Cannot open the ledger at {shown(loc)}: {exc}") from None
    return Place(fs, path.rstrip("/"), loc)
