"""What the side venvs (`devtools.sdk_env`: synapse-sdk, `devtools.ls_env`: label-studio) share:
a clean environment for their subprocesses, a cross-process lock (`fcntl.flock`, in the temp dir),
running pip with the tail of its output in the error, making a venv, and a stamp file written
atomically.

Each function that can fail takes the exception class to raise (`error`), so every venv keeps its
own (`SdkEnvError`, `LsEnvError`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ErrorType = type[Exception]


def clean_env() -> dict[str, str]:
    """os.environ without what would make a subprocess python see our venv or a stray startup file."""
    env = dict(os.environ)
    if not env.get("PYENV_VERSION"):
        env.pop("PYENV_VERSION", None)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(k, None)
    return env


def probe(exe: str) -> tuple[tuple[int, int], str] | None:
    """((major, minor), sys.executable) of an interpreter that runs and has venv and ensurepip."""
    code = "import sys, venv, ensurepip; print(sys.version_info[0], sys.version_info[1], sys.executable)"
    try:
        out = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=30, env=clean_env())
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    m = re.fullmatch(r"(\d+) (\d+) (.+)", out.stdout.strip())
    return ((int(m.group(1)), int(m.group(2))), m.group(3)) if m else None


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def lock_path(venv: Path, prefix: str = "totask-sdk-venv") -> Path:
    """The lock file that serialises builds of `venv`: in the temp dir (not in the work tree,
    where it would show up in git status; not in the venv, which a rebuild deletes)."""
    digest = hashlib.sha256(str(venv.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"{prefix}-{digest}.lock"


@contextlib.contextmanager
def locked(path: Path, timeout_s: float, error: ErrorType) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise error(f"timed out after {timeout_s:.0f} s waiting for the lock {path}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def run(cmd: list[str], what: str, timeout_s: float, error: ErrorType) -> str:
    """stdout+stderr of `cmd`; `error` with the tail of the output when it fails or times out."""
    try:
        out = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            env=clean_env() | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or "")[-4000:] if isinstance(exc.stdout, str) else ""
        raise error(f"{what} timed out after {timeout_s:.0f} s:\n{tail}") from None
    if out.returncode != 0:
        tail = "\n".join(out.stdout.splitlines()[-40:])
        raise error(f"{what} failed (exit {out.returncode}):\n{tail}")
    return out.stdout


def make_venv(venv: Path, exe: str, error: ErrorType) -> Path:
    """A new venv at `venv` made by `exe` (replacing an old venv there, never another folder); its python."""
    if venv.exists():
        if any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
            raise error(f"{venv} exists and is not a virtualenv; not replacing it")
        shutil.rmtree(venv)
    run([exe, "-m", "venv", str(venv)], f"{exe} -m venv {venv}", 300, error)
    return venv_python(venv)


def pip_install(
    py: Path, specs: list[str], dist: str, version: str, timeout_s: float, error: ErrorType
) -> str:
    """`pip install specs` into the venv of `py`, then check that distribution `dist` is at `version`."""
    run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-input", *specs],
        f"pip install {' '.join(specs)}",
        timeout_s,
        error,
    )
    found = run(
        [str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        f"checking the installed {dist}",
        60,
        error,
    ).strip()
    if found != version:
        raise error(f"expected {dist} {version} in {py.parent.parent}, found {found}")
    return found


def read_stamp(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_stamp(path: Path, data: dict) -> None:
    """Write the stamp atomically: a reader sees the old one or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
