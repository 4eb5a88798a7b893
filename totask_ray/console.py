"""A run's result as a person reads it at a terminal: the counts table and the first failures.

Shared by `totask-ray run` and `totask-ray demo`, below both, so neither imports the other.
"""

from __future__ import annotations

from operator import attrgetter

from totask_ray.result import COUNT_COLUMNS, ToTaskResult


def print_result(result: ToTaskResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    table = Table(title=f"ToTask {result.status.value}", show_header=True)
    for col, _ in COUNT_COLUMNS:
        table.add_column(col, justify="right")
    table.add_column("elapsed s", justify="right")
    table.add_row(*(str(attrgetter(attr)(result)) for _, attr in COUNT_COLUMNS), f"{result.elapsed_s:.1f}")
    console.print(table)
    console.print(result.message)
    if result.failures:
        ft = Table(title="Failed tasks (first 20)")
        ft.add_column("task", justify="right")
        ft.add_column("error")
        for f in result.failures[:20]:
            ft.add_row(str(f.task_id), f.error)
        console.print(ft)
