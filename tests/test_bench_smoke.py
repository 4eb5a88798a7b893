"""The benchmark suite still runs: `python -m bench all --smoke` (few tasks, one run per contender).

A separate process with its own local Ray (the suite's session cluster is not touched). Its
numbers mean nothing; what is checked is that every bench ran every contender to the end and
printed its tables and its JSON line. The public-SDK contenders run when the SDK venv is already
built (`.venv-sdk`); otherwise they are skipped and the reason is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("file", "client_cpu", "inference", "memory", "startup", "accelerator", "scaleout")

pytestmark = [pytest.mark.timeout(600), pytest.mark.ls_venv]


def test_every_bench_runs_in_smoke_mode():
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    took = time.monotonic() - start
    out = proc.stdout
    print(f"python -m bench all --smoke took {took:.0f} s", file=sys.stderr)
    for line in out.splitlines():
        if "skipped" in line or "n/a:" in line:
            print(line, file=sys.stderr)  # e.g. why the SDK contenders did not run
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    assert "FAILED" not in out.replace("MISSED", ""), out[-4000:]

    reports = {}
    for line in out.splitlines():
        if line.startswith('{"bench":'):
            d = json.loads(line)
            reports[d["bench"]] = d
    from devtools.ls_env import ls_venv_ready

    # the Label Studio bench skips (and says why) where label-studio could not be installed
    expected = {*BENCHES, *(["label_studio"] if ls_venv_ready(ROOT) else [])}
    assert set(reports) == expected, f"missing JSON lines: {expected - set(reports)}"
    assert reports["accelerator"]["rows"], "the accelerator bench measured no replica count"

    file_rows = reports["file"]["results"][0]["contenders"]
    assert {"raw c64", "totask-ray"} <= set(file_rows)
    for name, row in file_rows.items():
        assert row["failed_runs"] == 0, (name, row)
        assert row["tasks_per_s"] and row["tasks_per_s"] > 0, (name, row)
    sdk_note = reports["file"]["results"][0]["sdk"]
    if sdk_note:
        print(f"SDK file contenders: {sdk_note}", file=sys.stderr)
    else:
        assert {"sdk b1", "sdk b8"} <= set(file_rows)

    cpu_rows = reports["client_cpu"]["summary"]
    for name in ("bare", "totask-ray"):  # both wrote every task (read back from the platform)
        assert cpu_rows[name]["failed_runs"] == 0 and cpu_rows[name]["cpu_ms_per_task"] > 0, cpu_rows

    inf = reports["inference"]["contenders"]
    for name in ("raw 1 thread", "raw 2 threads", "totask-ray"):
        assert inf[name]["failed_runs"] == 0 and inf[name]["images_per_s"] > 0, (name, inf[name])
    if inf["sdk"].get("note"):
        print(f"SDK inference contender: {inf['sdk']['note']}", file=sys.stderr)
    else:
        assert inf["sdk"]["failed_runs"] == 0 and inf["sdk"]["images_per_s"] > 0, inf["sdk"]

    mem = reports["memory"]["summary"]
    for size, row in mem.items():
        assert row["failed_runs"] == 0 and row["peak_mb"] > row["baseline_mb"] > 50, (size, row)

    (run,) = reports["startup"]["results"]["breakdown"]
    assert "error" not in run, run
    assert 0 < run["to_first_annotation_s"] < run["to_done_s"]
    assert run["phases"]["actor start (constructor)"] is not None, run["phases"]
