"""Outcomes cross from the actors to the driver as batch columns: every field comes back as it went,
with its Python type (the report and the counters read them)."""

from __future__ import annotations

import dataclasses

import numpy as np

from totask_ray.pipeline.outcomes import Outcome, Stage, Status, from_columns, to_columns


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
