"""`diff` against an independent count: 1,000 seeded tasks with known perturbations (moved,
deleted, relabelled, added; boxes and polygons), and the CLI's table, JSON and CSV over two
ledgers written the way the actors write them."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from totask_ray.cli import app
from totask_ray.ledger.diff import KINDS, compare
from totask_ray.ledger.record import LedgerWriter
from totask_ray.ledger.store import create_run

LABELS = ["car", "person", "tree"]


def _obj(k: int, cls: str, kind: str) -> dict:
    x = 10.0 + 100 * k  # side by side, 60 apart: no two objects of a task overlap
    if kind == "bbox":
        return {"id": f"o{k}", "class_id": LABELS.index(cls) + 1, "type": "bbox",
                "coordinates": {"x": x, "y": 10.0, "width": 40.0, "height": 40.0}, "properties": {"label": cls}}  # fmt: skip
    pts = [[x, 10.0], [x + 40, 10.0], [x + 40, 50.0], [x, 50.0]]
    return {"id": f"o{k}", "class_id": LABELS.index(cls) + 1, "type": "polygon",
            "coordinates": {"points": pts}, "properties": {"label": cls}}  # fmt: skip


def _seeded(n: int, seed: int) -> tuple[dict[int, dict], dict[int, dict], Counter, dict[str, Counter]]:
    """A's and B's data for `n` tasks, and the test's own count of each perturbation made."""
    rng = random.Random(seed)
    a, b = {}, {}
    count: Counter = Counter()
    by_class: dict[str, Counter] = {}
    for tid in range(1, n + 1):
        objs = [
            _obj(k, rng.choice(LABELS), rng.choice(["bbox", "polygon"])) for k in range(rng.randint(1, 5))
        ]
        a[tid] = {"objects": objs}
        after = []
        for o in json.loads(json.dumps(objs)):
            cls = o["properties"]["label"]
            what = rng.choices(["kept", "moved", "deleted", "relabelled"], [70, 10, 10, 10])[0]
            count[what] += 1
            by_class.setdefault(cls, Counter())[what] += 1
            if what == "deleted":
                continue
            if what == "moved":  # a quarter of the width: IoU 0.6 (polygons), 20/60 (boxes: half)
                shift = 20.0 if o["type"] == "bbox" else 10.0
                if o["type"] == "bbox":
                    o["coordinates"]["x"] += shift
                else:
                    o["coordinates"]["points"] = [[p[0] + shift, p[1]] for p in o["coordinates"]["points"]]
            if what == "relabelled":
                new = LABELS[(LABELS.index(cls) + 1) % 3]
                o["properties"]["label"], o["class_id"] = new, LABELS.index(new) + 1
            after.append(o)
        if rng.random() < 0.1:  # a person adds one, away from every other
            cls = rng.choice(LABELS)
            after.append(_obj(7, cls, "bbox"))
            count["added"] += 1
            by_class.setdefault(cls, Counter())["added"] += 1
        b[tid] = {"objects": after}
    return a, b, count, by_class


def test_diff_counts_equal_the_perturbations_made():
    a, b, count, by_class = _seeded(1000, seed=4)
    result = compare("A", "B", [(t, a[t], b[t]) for t in a])
    assert result.tasks == 1000
    assert result.totals == {k: count[k] for k in KINDS}
    assert result.by_class == {c: {k: row[k] for k in KINDS} for c, row in sorted(by_class.items())}
    edits = sum(count[k] for k in KINDS if k != "kept")
    assert result.edit_rate == round(edits / result.objects_a, 6)


def _ledger(root: Path, data: dict[int, dict]) -> Path:
    spec = create_run(root, {"platform": "synapse", "host": "http://127.0.0.1:1", "project": 1})
    w = LedgerWriter(spec)
    for tid, d in data.items():
        w.before(tid, {}, d)
        w.written(tid)
    w.close()
    return Path(spec.path)


def test_diff_cli_table_json_and_csv(tmp_path):
    a, b, count, _ = _seeded(50, seed=9)
    la, lb = _ledger(tmp_path / "a", a), _ledger(tmp_path / "b", b)
    runner = CliRunner()
    table = runner.invoke(app, ["diff", str(la), str(lb)])
    assert table.exit_code == 0, table.output
    assert "edit rate" in table.output and "relabelled" in table.output
    out = runner.invoke(app, ["diff", str(la), str(lb), "--json", "--csv", str(tmp_path / "t.csv")])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["totals"] == {k: count[k] for k in KINDS}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert len(rows) == 50 and sum(int(r["deleted"]) for r in rows) == count["deleted"]
    missing = runner.invoke(app, ["diff", str(tmp_path / "nope"), "current"])
    assert missing.exit_code == 1 and "No run ledger" in missing.output
