"""The public SDK (synapse-sdk) as a contender: its venv, and its own ToTaskAction run as a child
process with the child's exact CPU time and peak RSS."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.environment import ROOT
from bench.local_platform import FILE_TARGET_SPEC, BenchPlatform

SDK_SCRIPT_DIR = ROOT / "tests" / "sdk_conformance"


# -- the public SDK -------------------------------------------------------------------------------


def sdk_python(build: bool = True) -> tuple[Path | None, str]:
    """(python of the synapse-sdk venv, "") or (None, why not). Builds it (~100 s) when `build`."""
    from devtools.sdk_env import SdkEnvError, ensure_sdk_venv, find_python312, sdk_venv_ready

    ready = sdk_venv_ready(ROOT)
    if ready is not None:
        return Path(ready), ""
    if not build:
        return (
            None,
            "the synapse-sdk venv (.venv-sdk) is not built; `python -m bench file` builds it (~100 s)",
        )
    py = find_python312()
    if py is None:
        return None, "no Python >= 3.12 on this machine: the synapse-sdk cannot run"
    try:
        return Path(ensure_sdk_venv(ROOT, python=py)), ""
    except SdkEnvError as exc:
        return None, f"building the synapse-sdk venv failed: {str(exc)[-300:]}"


@dataclass
class SdkRun:
    seconds: float
    returncode: int
    result: dict[str, Any] | None
    cpu_s: float
    stdout_tail: str
    stderr_tail: str
    max_rss_mb: float


def run_sdk_totask(
    sdk_py: Path, bp: BenchPlatform, params: dict[str, Any], workdir: Path, timeout_s: float = 3600
) -> SdkRun:
    """The SDK's own ToTaskAction through its job entrypoint, as a Ray job would run the plugin
    (`tests/sdk_conformance/run_sdk_calls.py:ToTask`, the file hook that downloads the target file).
    Wall time from spawn to exit, and the child's exact CPU time (its rusage)."""
    job = bp.store.create_job("to_task", params, agent_id=bp.agent)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(SDK_SCRIPT_DIR),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONWARNINGS": "ignore",
        "RAY_USAGE_STATS_ENABLED": "0",
        "SYNAPSE_HOST": bp.url,
        "SYNAPSE_ACCESS_TOKEN": bp.token,
        "SYNAPSE_JOB_ID": str(job),
        "SYNAPSE_ACTION_ENTRYPOINT": "run_sdk_calls.ToTask",
        "SYNAPSE_ACTION_PARAMS": json.dumps(params),
        "SYNAPSE_LANGUAGE": "en",
    }
    out_path, err_path = workdir / f"sdk-{job}.out", workdir / f"sdk-{job}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(sdk_py), "-m", "synapse_sdk.plugins.entrypoint"],
            stdout=out,
            stderr=err,
            env=env,
            cwd=workdir,
        )
        try:
            rc, cpu, rss = wait_rusage(proc, timeout_s)
        finally:
            if proc.returncode is None and proc.poll() is None:
                proc.kill()
                proc.wait()
        secs = time.perf_counter() - t0
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    result = None
    if "__SYNAPSE_RESULT_START__" in stdout:
        body = stdout.split("__SYNAPSE_RESULT_START__", 1)[1].split("__SYNAPSE_RESULT_END__", 1)[0]
        with contextlib.suppress(ValueError):
            result = json.loads(body)
    return SdkRun(secs, rc, result, cpu, stdout[-2000:], stderr[-2000:], rss)


def wait_rusage(proc: subprocess.Popen, timeout_s: float) -> tuple[int, float, float]:
    """Wait for `proc` and return (exit code, its CPU seconds, its peak RSS in MB) from wait4()."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
            return rc, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{proc.args} did not finish within {timeout_s:.0f} s")
        time.sleep(0.02)


def sdk_file_params(bp: BenchPlatform, batch_size: int, limit: int | None = None) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    if limit is not None:
        filters["limit"] = limit
    p: dict[str, Any] = {
        "name": f"bench_sdk_b{batch_size}",
        "project": bp.project,
        "agent": bp.agent,
        "method": "file",
        "target_specification_name": FILE_TARGET_SPEC,
        "task_filters": filters,
    }
    if batch_size > 1:
        p["batch_size"] = batch_size
    return p
