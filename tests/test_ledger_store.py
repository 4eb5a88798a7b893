"""The ledger's files as a kill leaves them: an unconfirmed write, a torn last line, a `w` line
whose `b` line was lost; where a run without --report keeps its ledger."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from totask_ray.ledger.record import LedgerWriter, digest
from totask_ray.ledger.store import (
    DEFAULT_ROOT,
    ROOT_ENV,
    LedgerError,
    create_run,
    ledger_root,
    one_run,
    read_entries,
    run_dirs,
)


def test_a_killed_writer_leaves_entries_undo_can_use(tmp_path):
    spec = create_run(tmp_path, {"platform": "synapse", "host": "http://127.0.0.1:1", "project": 3})
    w = LedgerWriter(spec)
    w.before(1, {"objects": []}, {"objects": [{"id": "a"}]}, workflow={"status": "pending", "assignee": None})
    w.written(1, workflow={"status": "in_review", "assignee": None})
    w.before(2, None, {"objects": [{"id": "b"}]})  # sent, never confirmed (the kill came first)
    w.written(9)  # a confirmation whose `b` line was torn: nothing says what to restore
    w.close()
    [entries_file] = Path(spec.path).glob("entries-*.jsonl")
    with open(entries_file, "a", encoding="utf-8") as f:
        f.write('{"t":3,"e":"b","before":nu')  # the torn last line of a SIGKILL
    got = read_entries(Path(spec.path))
    assert sorted(got) == [1, 2]
    assert got[1].confirmed and got[1].wf == {"status": "in_review", "assignee": None}
    assert not got[2].confirmed and got[2].digest == digest({"objects": [{"id": "b"}]})
    assert digest(None) == digest({})  # no data and the empty object are one state


def test_where_the_ledger_goes(tmp_path, monkeypatch):
    assert ledger_root(None, tmp_path / "r.jsonl") == tmp_path / "r.jsonl.ledger"
    assert ledger_root(tmp_path / "L", tmp_path / "r.jsonl") == tmp_path / "L"
    monkeypatch.delenv(ROOT_ENV, raising=False)
    assert ledger_root(None, None) == DEFAULT_ROOT == Path("totask-ledgers")
    monkeypatch.setenv(ROOT_ENV, "/srv/ledgers")
    assert ledger_root(None, None) == Path("/srv/ledgers")
    a = create_run(tmp_path, {"platform": "synapse", "host": "h", "project": 1})
    b = create_run(tmp_path, {"platform": "synapse", "host": "h", "project": 1})
    assert [p.name for p in run_dirs(tmp_path)] == sorted([a.run_id, b.run_id])
    with pytest.raises(LedgerError, match="holds 2 runs"):
        one_run(tmp_path)
    assert one_run(Path(a.path)) == Path(a.path)
    with pytest.raises(LedgerError, match="No run ledger"):
        run_dirs(tmp_path / "nothing")
    assert "access_token" not in (Path(a.path) / "run.json").read_text()
    assert os.listdir(a.path) == ["run.json"]  # no actor wrote: no entry file
