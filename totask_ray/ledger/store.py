"""A run's ledger directory: created by the driver before any actor writes, read by undo and diff.

Layout: a ledger root holds one directory per run (`<root>/<run id>/`), so a resumed run that
reports to the same place keeps the earlier run's ledger beside its own. A run's directory holds
`run.json` (the run: id, when, params, model_version, release, platform; never a secret), the
actors' `entries-*.jsonl` (`record.py`) and each undo's `undo-<when>.jsonl`.

Where the root is: `--ledger PATH`; else `<report>.ledger/` beside `--report`; else
`./totask-ledgers/` under the working directory.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from totask_ray.ledger.record import ENTRIES_GLOB, LEDGER_VERSION, LedgerSpec, open_sink

DEFAULT_ROOT = Path("totask-ledgers")
# Where runs with neither `--ledger` nor `--report` keep theirs, when set (else DEFAULT_ROOT, in the
# working directory): a notebook server or a test suite points it somewhere of its own.
ROOT_ENV = "TOTASK_LEDGER_DIR"
RUN_FILE = "run.json"


class LedgerError(Exception):
    """A ledger that cannot be used; the message says which path and what to give instead."""


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


def ledger_root(ledger: Path | None, report: Path | None) -> Path:
    if ledger is not None:
        return ledger
    if report is not None:
        return report.with_name(report.name + ".ledger")
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def new_run_id() -> str:
    """Sortable by start time, unique without coordination: `20261206T232530Z-3f9a1c`."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def create_run(root: Path, header: dict[str, Any]) -> LedgerSpec:
    """The run's directory with its `run.json`, written whole before any actor starts."""
    run_id = new_run_id()
    path = (root / run_id).resolve()
    path.mkdir(parents=True, exist_ok=False)
    full = RunHeader(run_id=run_id, started_at=datetime.now(UTC).isoformat(timespec="seconds"), **header)
    tmp = path / f".{RUN_FILE}.tmp"
    tmp.write_text(full.model_dump_json(indent=1), encoding="utf-8")
    tmp.replace(path / RUN_FILE)
    return LedgerSpec(run_id=run_id, path=str(path))


def run_dirs(path: Path) -> list[Path]:
    """The runs a path names: a run directory itself, or every run under a ledger root (oldest first)."""
    if (path / RUN_FILE).is_file():
        return [path]
    if path.is_dir():
        runs = sorted(p for p in path.iterdir() if (p / RUN_FILE).is_file())
        if runs:
            return runs
    raise LedgerError(
        f"No run ledger at {path}: give a run's ledger directory (it holds {RUN_FILE}) or the ledger "
        "root a run printed (`<report>.ledger/`, `--ledger PATH`, or ./totask-ledgers/)"
    )


def one_run(path: Path) -> Path:
    runs = run_dirs(path)
    if len(runs) > 1:
        names = ", ".join(p.name for p in runs)
        raise LedgerError(f"{path} holds {len(runs)} runs ({names}): give one of them, e.g. {runs[-1]}")
    return runs[0]


def read_header(run_dir: Path) -> RunHeader:
    try:
        return RunHeader.model_validate_json((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LedgerError(f"{run_dir / RUN_FILE} cannot be read: {exc}") from None


def _lines(run_dir: Path) -> Iterator[dict[str, Any]]:
    for f in sorted(run_dir.glob(ENTRIES_GLOB)):
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill: its write was never confirmed by a `w` line
                if isinstance(rec, dict) and isinstance(rec.get("t"), int) and rec.get("e") in ("b", "w"):
                    yield rec


def read_entries(run_dir: Path) -> dict[int, Entry]:
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


def ledger_bytes(run_dir: Path) -> int:
    return sum(f.stat().st_size for f in run_dir.glob(ENTRIES_GLOB))


def undo_report_path(run_dir: Path) -> Path:
    return run_dir / f"undo-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}.jsonl"


def start_run(root: Path, params: Any, platform: Any, release: str | None = None) -> LedgerSpec:
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
    spec = create_run(root, header)
    import ray

    # The annotators may run on any node: their lines go to one writer on this one (`LedgerSink`).
    return open_sink(spec) if ray.is_initialized() else spec
