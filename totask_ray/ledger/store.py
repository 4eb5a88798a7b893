"""A run's ledger directory: created by the driver before any actor writes, read by undo and diff.

Layout: a ledger root holds one directory per run (`<root>/<run id>/`), so a resumed run that
reports to the same place keeps the earlier run's ledger beside its own. A run's directory holds
`run.json` (the run: id, when, params, model_version, release, platform; never a secret), the
actors' `entries-*.jsonl` (`record.py`), on an object store the `parts/*.jsonl` a run wrote as it
went, and each undo's `undo-<when>.jsonl`.

Where the root is: `--ledger PATH`; else `<report>.ledger/` beside `--report`; else
`./totask-ledgers/` under the working directory. `--ledger` or `--report` may be a URI (s3://,
gs://, ...): the ledger is then on that object store (`place.py`), read and undone from there.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from totask_ray.errors import CriticalError
from totask_ray.ledger.place import (
    LedgerError,
    Location,
    Where,
    join,
    location,
    name_of,
    open_place,
    shown,
)
from totask_ray.ledger.record import LEDGER_VERSION, LedgerSpec, open_sink

__all__ = ["LedgerError"]

DEFAULT_ROOT = Path("totask-ledgers")
# Where runs with neither `--ledger` nor `--report` keep theirs, when set (else DEFAULT_ROOT, in the
# working directory): a notebook server or a test suite points it somewhere of its own.
ROOT_ENV = "TOTASK_LEDGER_DIR"
RUN_FILE = "run.json"


class RunHeader(BaseModel):
    """`run.json`: what a run was, in the words a person reviewing it would use."""

    model_config = ConfigDict(extra="allow")

    ledger_version: int = LEDGER_VERSION
    run_id: str
    started_at: str
    platform: str  # the registry's name: synapse, label-studio
    host: str
    project: int
    params: dict[str, Any] = Field(default_factory=dict)
    model_version: str | None = None
    release: str | None = None  # the pre-processor's `code@version`, for an inference run
    write: str | None = None  # Label Studio: predictions or annotations


class Entry(BaseModel):
    """One task's record, merged from its `b` and `w` lines."""

    task_id: int
    at: float = 0.0
    writes_data: bool = False
    before: Any = None
    wrote: Any = None
    digest: str | None = None
    confirmed: bool = False  # the `w` line is there: the platform answered the write
    created: dict[str, Any] | None = None
    wf0: dict[str, Any] | None = None  # workflow fields as read before the write
    wf: dict[str, Any] | None = None  # workflow fields as the run left them (confirmed only)


def ledger_root(ledger: Where | None, report: Where | None) -> Location:
    """`--ledger`, else `<report>.ledger` beside `--report` (a URI beside a URI), else the default."""
    if ledger is not None:
        return location(ledger)
    if report is not None:
        return location(os.fspath(report) + ".ledger")
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def new_run_id() -> str:
    """Sortable by start time, unique without coordination: `20261206T232530Z-3f9a1c`."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def create_run(root: Where, header: dict[str, Any]) -> LedgerSpec:
    """The run's directory with its `run.json`, written whole before any actor starts (on a disk
    through a temporary file; on an object store a PUT is whole by itself)."""
    run_id = new_run_id()
    full = RunHeader(run_id=run_id, started_at=datetime.now(UTC).isoformat(timespec="seconds"), **header)
    text = full.model_dump_json(indent=1)
    where = join(root, run_id)
    if isinstance(where, str):
        place = open_place(where)
        place.put(RUN_FILE, text.encode())  # also proves now, before any task, that the run may write there
        return LedgerSpec(run_id=run_id, path=where)
    path = where.resolve()
    path.mkdir(parents=True, exist_ok=False)
    tmp = path / f".{RUN_FILE}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path / RUN_FILE)
    return LedgerSpec(run_id=run_id, path=str(path))


def run_dirs(path: Where) -> list[Location]:
    """The runs a location names: a run directory itself, or every run under a ledger root (oldest
    first), in the form it was given (a `Path`, or a URI)."""
    loc = location(path)
    place = open_place(loc)
    if place.is_file(RUN_FILE):
        return [loc]
    runs = [join(loc, name) for name in place.subdirs() if place.is_file(f"{name}/{RUN_FILE}")]
    if runs:
        return runs
    raise LedgerError(
        f"No run ledger at {shown(loc)}: give a run's ledger directory (it holds {RUN_FILE}) or the ledger "
        "root a run printed (`<report>.ledger/`, `--ledger PATH`, or ./totask-ledgers/)"
    )


def one_run(path: Where) -> Location:
    runs = run_dirs(path)
    if len(runs) > 1:
        names = ", ".join(name_of(p) for p in runs)
        raise LedgerError(
            f"{shown(path)} holds {len(runs)} runs ({names}): give one of them, e.g. {shown(runs[-1])}"
        )
    return runs[0]


def read_header(run_dir: Where) -> RunHeader:
    where = f"{shown(run_dir)}/{RUN_FILE}"
    try:
        return RunHeader.model_validate_json(open_place(run_dir).read_bytes(RUN_FILE))
    except (LedgerError, ValueError) as exc:
        raise LedgerError(f"{where} cannot be read: {exc}") from None


def _lines(run_dir: Where) -> Iterator[dict[str, Any]]:
    place = open_place(run_dir)
    for f, _ in place.entry_files():
        for line in place.lines(f):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill: its write was never confirmed by a `w` line
            if isinstance(rec, dict) and isinstance(rec.get("t"), int) and rec.get("e") in ("b", "w"):
                yield rec


def read_entries(run_dir: Where) -> dict[int, Entry]:
    """Every task the run recorded, by id (a `w` line without its `b` line is dropped: its
    `b` line was torn, and nothing says what to restore)."""
    entries: dict[int, Entry] = {}
    confirmations: list[dict[str, Any]] = []
    for rec in _lines(run_dir):
        if rec["e"] == "w":
            confirmations.append(rec)
            continue
        tid = rec["t"]
        if tid in entries:  # a task done twice by one run (never expected): the first before holds
            continue
        writes = "digest" in rec
        entries[tid] = Entry(
            task_id=tid,
            at=rec.get("at", 0.0),
            writes_data=writes,
            before=rec.get("before"),
            wrote=rec.get("wrote"),
            digest=rec.get("digest"),
            wf0=rec.get("wf0"),
        )
    for rec in confirmations:
        e = entries.get(rec["t"])
        if e is not None:
            e.confirmed = True
            e.created = rec.get("created") or e.created
            e.wf = rec.get("wf") or e.wf
    return entries


def ledger_bytes(run_dir: Where) -> int:
    return sum(size for _, size in open_place(run_dir).entry_files())


def undo_report(run_dir: Where) -> tuple[Location, IO[str]]:
    """A new undo report in the run's directory: where it is, and the file to write its lines to
    (on an object store it is put whole when closed)."""
    name = f"undo-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}.jsonl"
    return join(run_dir, name), open_place(run_dir).text_writer(name)


def start_run(root: Where, params: Any, platform: Any, release: str | None = None) -> LedgerSpec:
    """Create a run's ledger from what the driver holds: the job's params (a `ToTaskParams`; they
    hold no secret), the platform's config (only its kind, host and Label Studio's write settings
    are kept: never a token) and the pre-processor's `code@version` for an inference run."""
    from totask_ray.platform.connect import KINDS

    kind = next((k.name for k in KINDS if isinstance(platform, k.config)), type(platform).__name__)
    write = getattr(platform, "write", None)
    header = {
        "platform": kind,
        "host": str(platform.host),
        "project": int(params.project),
        "params": params.model_dump(mode="json"),
        "model_version": getattr(platform, "model_version", None),
        "release": release,
        "write": str(write.value) if write is not None else None,
    }
    try:
        spec = create_run(root, header)
    except (LedgerError, OSError) as exc:
        raise CriticalError(
            f"The run's ledger cannot be created: {exc}; give --ledger a place this run may write to, or "
            "--no-ledger to keep none"
        ) from None
    import ray

    # The annotators may run on any node: their lines go to one writer on this one (`LedgerSink`).
    return open_sink(spec) if ray.is_initialized() else spec
