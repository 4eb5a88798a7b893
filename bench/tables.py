"""Numbers and tables: medians, ratios, number formatting, Markdown tables, target lines, and what a
bench prints (`say` to stdout, `log` to stderr, one JSON line per bench)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

# -- numbers and tables ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v != v:  # nan
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (pipes), readable in a terminal and pasteable into BENCHMARKS.md."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(f"\n{title}\n")
    for k, r in enumerate(cells):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )
        if k == 0:
            lines.append(
                "|"
                + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths))
                + "|"
            )
    return "\n".join(lines)


def target_line(
    name: str, value: float | None, op: str, goal: float, unit: str = ""
) -> tuple[str, bool | None]:
    """`(text, met)`; met is None when the value could not be measured."""
    if value is None or value != value:
        return f"{name}: n/a (target {op} {goal:g}{unit})", None
    met = value >= goal if op == ">=" else value <= goal
    return f"{name}: {value:.2f}{unit} (target {op} {goal:g}{unit}) -> {'MET' if met else 'MISSED'}", met


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dump_json(name: str, obj: Any) -> None:
    """One machine-readable line per bench, after its tables."""
    say(json.dumps({"bench": name, **obj}, default=str))
