"""`undo_run`: put back what a run changed, where the task still holds what the run wrote.

It runs on the driver alone (no Ray): a thread pool over the platform's blocking client, one task
per call, each task's failure its own outcome. Per task of the run's ledger:

- data (Synapse and the embedded platform): the task holds the run's digest → the data it held
  before is written back; it holds the "before" already → nothing (an earlier undo restored it, or
  an unconfirmed write never landed); anything else → a person or another run changed it since:
  left as it is, and listed with what changed (`diff.compare_task`);
- Label Studio: the prediction or annotation the run created is deleted where it is as the run
  made it; a prediction a person made an annotation from, or an annotation a person updated, is
  kept and listed; one that is gone already is nothing to do;
- workflow (status, assignee): put back to what the task held before the run, where it is still
  what the run left and its data was not changed since; where the platform refuses (a status a
  stage away), or the task moved on, it is listed.

A second undo finds every task as the first left it and writes nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import IO, Any

from pydantic import BaseModel, Field

from totask_ray.ledger.diff import compare_task
from totask_ray.ledger.place import Where, shown
from totask_ray.ledger.record import digest
from totask_ray.ledger.store import Entry, RunHeader, read_entries, read_header, run_dirs, undo_report
from totask_ray.net.redact import safe_error
from totask_ray.platform.errors import PlatformError
from totask_ray.result import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL


class UndoStatus(StrEnum):
    RESTORED = "restored"  # what the run wrote was taken back
    ALREADY = "already"  # the task holds what it held before the run: nothing to do
    KEPT = "kept"  # changed since the run: left as it is (listed)
    FAILED = "failed"  # the undo of this task failed (listed, with why)


@dataclass
class TaskUndo:
    task_id: int
    status: UndoStatus
    detail: str = ""
    workflow: str = ""  # "reverted", or why the workflow was left as it is

    def to_json(self) -> str:
        d = {"task_id": self.task_id, "status": self.status.value}
        if self.detail:
            d["detail"] = self.detail
        if self.workflow:
            d["workflow"] = self.workflow
        return json.dumps(d, separators=(",", ":"))


class Listed(BaseModel):
    task_id: int
    detail: str


class UndoResult(BaseModel):
    """What an undo did, per run; `exit_code` as `run`'s: 0 all ok, 2 some failed, 1 all failed."""

    run_ids: list[str] = Field(default_factory=list)
    dry_run: bool = False
    total: int = 0
    restored: int = 0
    already: int = 0
    kept: int = 0
    failed: int = 0
    workflow_reverted: int = 0
    kept_tasks: list[Listed] = Field(default_factory=list)  # changed since the run: what changed
    workflow_listed: list[Listed] = Field(default_factory=list)  # workflow left as it is, and why
    failures: list[Listed] = Field(default_factory=list)
    reports: list[str] = Field(default_factory=list)

    @property
    def writes(self) -> int:
        return self.restored + self.workflow_reverted

    @property
    def exit_code(self) -> int:
        if self.failed and self.failed == self.total:
            return EXIT_FAILED
        return EXIT_PARTIAL if self.failed else EXIT_OK


def platform_for(header: RunHeader, token: str | None = None, host: str | None = None) -> Any:
    """The platform the run wrote to: its kind and host from the ledger, its token from the
    environment (or `token`), and Label Studio's write settings from the ledger."""
    from totask_ray.platform.connect import config_from_env

    overrides: dict[str, Any] = {"host": host or header.host}
    if header.platform == "label-studio":
        overrides.update(model_version=header.model_version, write=header.write, project=header.project)
        if token:
            overrides["api_key"] = token
    elif token:
        overrides["access_token"] = token
    return config_from_env(header.platform, **overrides)


def undo_run(
    ledger: Where,
    platform: Any = None,
    *,
    dry_run: bool = False,
    concurrency: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> UndoResult:
    """Undo every run under `ledger` (a run's directory, or a ledger root: its runs newest first;
    a local path or an object-store URI such as ``s3://bucket/run.jsonl.ledger/<run id>``).

    `platform`: a `PlatformConfig` (default: the ledger's platform and host, the token from the
    environment). `dry_run`: say what would be done, write nothing (not even the undo report).
    `progress(done, total)` is called as tasks finish."""
    from totask_ray.platform.connect import connect

    out = UndoResult(dry_run=dry_run)
    for run_dir in reversed(run_dirs(ledger)):
        header = read_header(run_dir)
        entries = read_entries(run_dir)
        config = platform if platform is not None else platform_for(header)
        client = connect(config)
        undoer: _Undoer = (
            _LabelStudioUndo(client, header, dry_run)
            if header.platform == "label-studio"
            else _DataUndo(client, header, dry_run)
        )
        report_path, report = (None, None) if dry_run else undo_report(run_dir)
        try:
            results = _undo_all(undoer, list(entries.values()), report, concurrency, progress)
        finally:
            client.close()
        out.run_ids.append(header.run_id)
        if report_path is not None:
            out.reports.append(shown(report_path))
        for r in results:
            out.total += 1
            setattr(out, r.status.value, getattr(out, r.status.value) + 1)
            if r.status is UndoStatus.KEPT:
                out.kept_tasks.append(Listed(task_id=r.task_id, detail=r.detail))
            if r.status is UndoStatus.FAILED:
                out.failures.append(Listed(task_id=r.task_id, detail=r.detail))
            if r.workflow == "reverted":
                out.workflow_reverted += 1
            elif r.workflow:
                out.workflow_listed.append(Listed(task_id=r.task_id, detail=r.workflow))
    return out


def _undo_all(
    undoer: _Undoer,
    entries: list[Entry],
    report: IO[str] | None,
    concurrency: int,
    progress: Callable[[int, int], None] | None,
) -> list[TaskUndo]:
    """Every entry on a thread pool, each task's outcome written to the undo report as it ends
    (`report` is closed here; on an object store that is when it is put)."""
    lock = threading.Lock()
    done = 0

    def one(entry: Entry) -> TaskUndo:
        nonlocal done
        try:
            res = undoer.undo(entry)
        except Exception as exc:  # this task's failure, never the undo's
            res = TaskUndo(entry.task_id, UndoStatus.FAILED, safe_error(exc))
        with lock:
            done += 1
            if report is not None:
                report.write(res.to_json() + "\n")
            if progress is not None:
                progress(done, len(entries))
        return res

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, entries))
    finally:
        if report is not None:
            report.close()


class _Undoer:
    def __init__(self, client: Any, header: RunHeader, dry_run: bool):
        self.client = client
        self.header = header
        self.dry_run = dry_run

    def undo(self, entry: Entry) -> TaskUndo:  # pragma: no cover - per platform
        raise NotImplementedError


class _DataUndo(_Undoer):
    """Platforms that hold one data object per task (Synapse, the embedded platform)."""

    def undo(self, entry: Entry) -> TaskUndo:
        task = self.client.get_task(entry.task_id)
        res = TaskUndo(entry.task_id, UndoStatus.ALREADY)
        if entry.writes_data:
            now = digest(task.data)
            if now == entry.digest and entry.digest != digest(entry.before):
                if not self.dry_run:
                    self._put_back(task, entry.before)
                res.status = UndoStatus.RESTORED
            elif now != digest(entry.before):
                res.status = UndoStatus.KEPT
                res.detail = (
                    "changed since the run: " + compare_task(entry.task_id, entry.wrote, task.data).describe()
                )
        res.workflow = self._workflow(entry, task, data_kept=res.status is UndoStatus.KEPT)
        return res

    def _put_back(self, task: Any, before: Any) -> None:
        schema = self.header.params.get("schema")
        self.client.annotate_task(task, before if isinstance(before, dict) else {}, schema)

    def _workflow(self, entry: Entry, task: Any, *, data_kept: bool) -> str:
        wf0 = entry.wf0
        if not wf0:
            return ""
        now = {"status": task.status, "assignee": task.assignee}
        if entry.wf is None:  # never confirmed: the run was killed before it said what it left
            moved = {k: (wf0.get(k), now[k]) for k in now if k in wf0 and now[k] != wf0.get(k)}
            if not moved:
                return ""
            said = ", ".join(f"{k} is {b!r} (was {a!r} before the run)" for k, (a, b) in moved.items())
            return f"left as it is: the run's workflow change was not confirmed; {said}"
        changed = {k: v for k, v in entry.wf.items() if k in wf0 and v != wf0[k]}
        if not changed:
            return ""
        if all(now[k] == wf0[k] for k in changed):
            return ""  # put back already
        if data_kept:
            return "left as it is: the task's data was changed since the run"
        moved_on = [k for k in changed if now[k] != changed[k]]
        if moved_on:
            said = ", ".join(f"{k} is {now[k]!r} (the run left {changed[k]!r})" for k in moved_on)
            return f"left as it is: changed since the run: {said}"
        if self.dry_run:
            return "reverted"
        try:
            self.client.update_task(entry.task_id, {k: wf0[k] for k in changed})
        except PlatformError as exc:
            return f"left as it is: the platform refused to put it back: {safe_error(exc)}"
        return "reverted"


class _LabelStudioUndo(_Undoer):
    """Label Studio: delete exactly the predictions or annotations the run created.

    A prediction a person made an annotation from (`parent_prediction`) is kept, and so is one
    whose result changed; an annotation a person updated (its result no longer the run's) is kept.
    A write the run never confirmed (killed between the import and its answer) has no id: its
    prediction is the task's one of the run's `model_version` (the run skips a task that holds one,
    so no other run of that version wrote there); its annotation is the task's first one created
    after the run read the task (the run skips a task with any annotation)."""

    def undo(self, entry: Entry) -> TaskUndo:
        from totask_ray.platform.label_studio.created import result_digest

        raw = self.client.task_raw(entry.task_id)
        created = entry.created or {}
        kind = created.get("kind") or ("annotation" if self.header.write == "annotations" else "prediction")
        res = TaskUndo(entry.task_id, UndoStatus.ALREADY)
        if kind == "prediction":
            preds = [p for p in raw.get("predictions") or [] if isinstance(p, dict)]
            if created:
                mine = [p for p in preds if p.get("id") == created.get("id")]
            else:
                mine = [p for p in preds if p.get("model_version") == self.header.model_version]
            for p in mine:
                made = [
                    a.get("id")
                    for a in raw.get("annotations") or []
                    if isinstance(a, dict) and a.get("parent_prediction") == p.get("id")
                ]
                if made:
                    res.status = UndoStatus.KEPT
                    res.detail = f"annotation {', '.join(map(str, made))} was made from prediction {p['id']}"
                elif created and result_digest(p.get("result")) != created.get("digest"):
                    res.status = UndoStatus.KEPT
                    res.detail = f"prediction {p['id']} was changed since the run"
                else:
                    if not self.dry_run:
                        self.client.delete_prediction(p["id"])
                    res.status = UndoStatus.RESTORED
            return res
        anns = [a for a in raw.get("annotations") or [] if isinstance(a, dict)]
        if created:
            mine = [a for a in anns if a.get("id") == created.get("id")]
        else:
            mine = sorted((a for a in anns if _after(a.get("created_at"), entry.at)), key=lambda a: a["id"])[
                :1
            ]
        for a in mine:
            if created and result_digest(a.get("result")) != created.get("digest"):
                res.status = UndoStatus.KEPT
                res.detail = f"annotation {a['id']} was updated since the run"
                continue
            if not self.dry_run:
                self.client.delete_annotation(a["id"])
            res.status = UndoStatus.RESTORED
        return res


def _after(stamp: Any, at: float) -> bool:
    """Whether an ISO time Label Studio gave is at or after `at` (unix seconds, 5 s of clock slack)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp() >= at - 5
    except ValueError:
        return False
