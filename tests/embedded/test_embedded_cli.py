"""`platform start` and `platform seed` as subprocesses."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import totask_ray

CLI = [sys.executable, "-c", "from totask_ray.embedded.cli import platform_app; platform_app()"]
REPO = str(Path(totask_ray.__file__).resolve().parents[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNAPSE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _first_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf and time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def _start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*CLI, "start", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    url = _first_line(proc)
    if not re.fullmatch(r"http://127\.0\.0\.1:\d+", url):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"start did not print its URL: {url!r}\n{err.decode()[-2000:]}")
    return proc, url


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    return out.decode(), err.decode()


def test_start_then_seed_over_http(tmp_path):
    token = "cli-test-token-123"
    proc, url = _start(["--data-dir", str(tmp_path / "p"), "--port", "0"], _env(SYNAPSE_ACCESS_TOKEN=token))
    try:
        assert httpx.get(f"{url}/health/").status_code == 200
        assert httpx.get(f"{url}/projects/1/").status_code == 401
        r = subprocess.run(
            [*CLI, "seed", "--url", url, "--demo", "files", "--tasks", "12", "--seed", "3"],
            capture_output=True,
            env=_env(SYNAPSE_ACCESS_TOKEN=token),
            timeout=60,
        )
        assert r.returncode == 0, r.stderr.decode()
        out = r.stdout.decode()
        assert out.count("\n") == 1 and token not in out and token not in r.stderr.decode()
        ids = json.loads(out)
        assert ids["tasks"] == 12 and ids["demo"] == "files"
        h = {"Synapse-Access-Token": f"Token {token}"}
        got = httpx.get(
            f"{url}/sdk/tasks/", params={"project": ids["project"], "fields": "id"}, headers=h
        ).json()
        assert [t["id"] for t in got["results"]] == list(
            range(ids["task_ids"]["first"], ids["task_ids"]["last"] + 1)
        )
        # the token may be given as an option too; a wrong one fails cleanly without echoing it
        r = subprocess.run(
            [*CLI, "seed", "--url", url, "--token", "not-the-token", "--tasks", "1"],
            capture_output=True,
            env=_env(),
            timeout=60,
        )
        assert (
            r.returncode == 1 and r.stdout == b"" and b"401" in r.stderr and b"not-the-token" not in r.stderr
        )
    finally:
        out, err = _stop(proc)
    assert token not in out and token not in err


def test_start_without_token_writes_one_and_does_not_print_it(tmp_path):
    data = tmp_path / "q"
    proc, url = _start(["--data-dir", str(data), "--port", "0", "--tenant", "t1"], _env())
    try:
        token = (data / "token").read_text().strip()
        assert len(token) >= 24 and (data / "token").stat().st_mode & 0o077 == 0
        h = {"Synapse-Access-Token": f"Token {token}", "Synapse-Tenant": "Token t1"}
        assert (
            httpx.get(f"{url}/sdk/tasks/", params={"project": 1}, headers=h).status_code == 400
        )  # no such project
        assert httpx.get(f"{url}/health/").status_code == 200
    finally:
        out, err = _stop(proc)
    assert token not in out and token not in err


def test_start_on_a_busy_port_fails_cleanly(platform, tmp_path):
    port = platform.url.rsplit(":", 1)[1]
    r = subprocess.run(
        [*CLI, "start", "--data-dir", str(tmp_path / "busy"), "--port", port, "--token", "x"],
        capture_output=True,
        env=_env(),
        timeout=60,
    )
    # SO_REUSEADDR does not allow two listeners on one port; the message says what to do.
    assert r.returncode == 1 and b"--port" in r.stderr
