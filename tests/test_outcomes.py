"""Outcomes cross from the actors to the driver as batch columns: every field comes back as it went,
with its Python type (the report and the counters read them); what each status counts as is one table."""

from __future__ import annotations

import dataclasses
from collections import Counter
from operator import attrgetter

import numpy as np

from totask_ray.pipeline.outcomes import (
    COUNTS,
    DONE_STATUSES,
    Outcome,
    Stage,
    Status,
    from_columns,
    to_columns,
    totals,
)
from totask_ray.result import COUNT_COLUMNS, ToTaskResult


def test_every_field_survives_the_columns_with_its_type():
    sent = [
        Outcome(7, Status.SUCCESS, written=True, workflow_applied=True, objects=3, duration_ms=1.5,
                finished_at=1_765_000_000.25, node="node-a"),
        Outcome(8, Status.FAILED, Stage.CONVERT, error="the primary file is not an image", critical=True,
                workflow_error="refused", would_write='{"objects":[]}'),
    ]  # fmt: skip
    columns = to_columns(sent)
    assert set(columns) == {f.name for f in dataclasses.fields(Outcome)} - {"extra"}
    assert all(isinstance(c, np.ndarray) and len(c) == 2 for c in columns.values())
    got = list(from_columns(columns))
    assert got == sent
    for field in dataclasses.fields(Outcome):
        for a, b in zip(sent, got, strict=True):
            assert type(getattr(b, field.name)) is type(getattr(a, field.name)), field.name


def test_one_counter_per_status_fills_the_metrics_and_the_result_from_the_table():
    counts = Counter(
        {Status.SUCCESS: 4, Status.EMPTY: 2, Status.FAILED: 3, Status.SKIPPED: 5, Status.UNCHANGED: 7}
    )
    assert totals(counts, "metrics") == {"success": 18, "failed": 3, "empty": 2}
    assert totals(counts, "result") == {
        "success_count": 6, "empty_count": 2, "failed_count": 3, "skipped_count": 5, "unchanged_count": 7
    }  # fmt: skip
    assert set(DONE_STATUSES) == {Status.SUCCESS, Status.EMPTY, Status.SKIPPED, Status.UNCHANGED}
    assert COUNTS[Status.STOPPED].metrics == ()  # never started: neither counted nor reported
    # Every count field a status fills is shown in the console's table, which names only real attributes.
    shown = {attr for _, attr in COUNT_COLUMNS}
    assert {f for c in COUNTS.values() for f in c.result} <= shown
    result = ToTaskResult(status="SUCCEEDED", message="")
    for _, attr in COUNT_COLUMNS:
        assert isinstance(attrgetter(attr)(result), int), attr
