"""`totask-ray undo LEDGER` and `totask-ray diff A B`: the ledger's two commands.

Exit codes as `run`'s: 0 all ok, 2 some tasks failed, 1 the command failed (a ledger that cannot
be read, a platform that refuses). Messages go to stderr without tokens or stack traces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from totask_ray.ledger.diff import KINDS, DiffResult, compare, pairs_of
from totask_ray.ledger.store import LedgerError, one_run, read_entries, read_header, run_dirs
from totask_ray.ledger.undo import UndoResult, platform_for, undo_run
from totask_ray.platform.errors import PlatformError
from totask_ray.result import EXIT_FAILED

CURRENT = "current"
_err = Console(stderr=True)
_LISTED = 20  # tasks listed in the terminal; every one is in the undo report


def undo(
    ledger: Annotated[
        str,
        typer.Argument(
            help="A run's ledger directory, or a ledger root (every run in it); a path or an "
            "object-store URI (s3://bucket/run.jsonl.ledger/<run id>, credentials from the environment)."
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be undone; write nothing.")
    ] = False,
    token: Annotated[
        str | None, typer.Option("--token", help="The platform's token (default: its variable).")
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="The platform's URL (default: the ledger's).")
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=256, help="Tasks in flight.")] = 16,
) -> None:
    """Undo what a run changed, where the task still holds what the run wrote; list the rest."""
    try:
        header = read_header(run_dirs(ledger)[-1])  # where the runs wrote (a root's runs share it)
        config = platform_for(header, token=token, host=host)
        with Progress(
            TextColumn("undo"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=_err
        ) as bar:
            job = bar.add_task("undo", total=None)
            result = undo_run(
                ledger,
                config,
                dry_run=dry_run,
                concurrency=concurrency,
                progress=lambda done, total: bar.update(job, completed=done, total=total),
            )
    except (LedgerError, PlatformError) as exc:
        typer.echo(f"undo failed: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    print_undo(result)
    raise typer.Exit(result.exit_code)


def print_undo(r: UndoResult) -> None:
    c = Console()
    verb = "would be" if r.dry_run else "were"
    table = Table(
        title=f"undo of run {', '.join(r.run_ids)}" + (" (dry run: nothing written)" if r.dry_run else "")
    )
    for col in (
        "tasks",
        "restored",
        "as before already",
        "kept (changed since)",
        "failed",
        "workflow reverted",
    ):
        table.add_column(col, justify="right")
    table.add_row(*(str(v) for v in (r.total, r.restored, r.already, r.kept, r.failed, r.workflow_reverted)))
    c.print(table)
    for title, rows in (
        ("Kept: changed since the run", r.kept_tasks),
        ("Workflow left as it is", r.workflow_listed),
        ("Failed", r.failures),
    ):
        if rows:
            c.print(f"{title} ({len(rows)}):")
            for row in rows[:_LISTED]:
                c.print(f"  task {row.task_id}: {row.detail}", markup=False, highlight=False)
            if len(rows) > _LISTED:
                c.print(f"  ... {len(rows) - _LISTED} more in the undo report")
    if r.reports:
        c.print(f"{r.restored} task(s) {verb} restored; per task: {', '.join(r.reports)}", markup=False)


def load_side(
    name: str, other: str | None, token: str | None = None, concurrency: int = 16
) -> dict[int, Any]:
    """A side of a diff: what a run's ledger says it wrote, or (`current`) what those tasks hold now."""
    if name != CURRENT:
        run = one_run(name)
        return {tid: e.wrote for tid, e in read_entries(run).items() if e.writes_data}
    if other is None:
        raise LedgerError("`current` needs a ledger on the other side: it says which tasks and where")
    run = one_run(other)
    header = read_header(run)
    from totask_ray.platform.connect import connect

    ids = [tid for tid, e in read_entries(run).items() if e.writes_data]
    client = connect(platform_for(header, token=token))
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            tasks = list(pool.map(client.get_task, ids))
    finally:
        client.close()
    return {t.id: t.data for t in tasks}


def diff_sides(a: str, b: str, token: str | None = None) -> DiffResult:
    if (a == CURRENT) != (b == CURRENT):  # Label Studio: both sides read back as it holds them
        run = one_run(b if a == CURRENT else a)
        if read_header(run).platform == "label-studio":
            from totask_ray.ledger.ls_current import label_studio_sides

            s = label_studio_sides(run, token)
            pair = (s.current, s.wrote) if a == CURRENT else (s.wrote, s.current)
            return compare(a, b, pairs_of(*pair))
    side_a = load_side(a, b if b != CURRENT else None, token)
    side_b = load_side(b, a if a != CURRENT else None, token)
    return compare(a, b, pairs_of(side_a, side_b))


def diff(
    a: Annotated[str, typer.Argument(help="A run's ledger, or `current`.")],
    b: Annotated[str, typer.Argument(help="A run's ledger, or `current` (what the tasks hold now).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write one row per task here.")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="The platform's token (default: its variable).")
    ] = None,
) -> None:
    """What changed between A and B per class: kept, moved, relabelled, deleted, added; the edit rate."""
    try:
        result = diff_sides(a, b, token)
    except (LedgerError, PlatformError) as exc:
        typer.echo(f"diff failed: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if csv_path is not None:
        csv_path.write_text(result.csv(), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(result.model_dump(exclude={"per_task"}), indent=1))
    else:
        print_diff(result)


def print_diff(r: DiffResult) -> None:
    c = Console()
    table = Table(
        title=f"diff {r.a} → {r.b}: {r.tasks} tasks, {r.tasks_edited} edited, edit rate {r.edit_rate:.1%}"
    )
    table.add_column("class")
    for k in KINDS:
        table.add_column(k, justify="right")
    rows: Mapping[str, Mapping[str, int]] = {**r.by_class, "all": r.totals}
    for cls, row in rows.items():
        table.add_row(cls, *(str(row[k]) for k in KINDS))
    c.print(table)
    c.print(
        f"kept: same class, IoU >= {r.keep_iou}; moved: below it; a match needs IoU >= {r.match_iou}",
        markup=False,
    )
