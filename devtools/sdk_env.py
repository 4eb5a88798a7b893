"""A separate virtualenv with the public `synapse-sdk` client, for conformance tests and benchmarks.

The real client (`synapse-sdk==2026.2.17`) needs Python >= 3.12 while this package runs on 3.11, so
it lives in its own venv (default `<repo>/.venv-sdk`, gitignored) and is driven as a subprocess.

- `find_python312()` finds a working interpreter >= 3.12: `python3.12`/`python3.13`/... on PATH
  (each is run, so a pyenv shim that fails is skipped), then `$(pyenv root)/versions/3.1x*/bin/`
  and `~/.pyenv/versions/...`, then `python3`/`python` on PATH, then `uv python find`.
  `TOTASK_SDK_PYTHON` names one explicitly.
- `ensure_sdk_venv(root)` builds the venv once and returns its python. A stamp file records what was
  installed; a later call with the same request returns at once. A lock file (`fcntl.flock`, in
  the temp dir) keeps two processes from building it at the same time. A pip failure raises `SdkEnvError` with the tail
  of pip's output. The lock, pip and stamp machinery is `devtools.venvs`, shared with `devtools.ls_env`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from devtools import venvs
from devtools.venvs import lock_path, venv_python

SDK_PACKAGE = "synapse-sdk"
SDK_VERSION = "2026.2.17"
MIN_PYTHON = (3, 12)
VENV_DIR = ".venv-sdk"
STAMP_NAME = ".totask-sdk-stamp.json"
PIP_TIMEOUT_S = 1800

_CANDIDATE_NAMES = ("python3.12", "python3.13", "python3.14", "python3.15")
_FALLBACK_NAMES = ("python3", "python")


class SdkEnvError(RuntimeError):
    """The SDK venv could not be built (the message ends with the tail of the failing output)."""


_probe = venvs.probe


def _version_key(path: str) -> tuple[int, int, int]:
    m = re.search(r"versions/(\d+)\.(\d+)(?:\.(\d+))?", path)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else (0, 0, 0)


def _pyenv_roots() -> list[Path]:
    roots: list[Path] = []
    if os.environ.get("PYENV_ROOT"):
        roots.append(Path(os.environ["PYENV_ROOT"]))
    exe = shutil.which("pyenv")
    if exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([exe, "root"], capture_output=True, text=True, timeout=15)
            if out.returncode == 0 and out.stdout.strip():
                roots.append(Path(out.stdout.strip()))
    roots.append(Path.home() / ".pyenv")
    seen: list[Path] = []
    for r in roots:
        if r not in seen:
            seen.append(r)
    return seen


def python_candidates() -> Iterator[str]:
    """Interpreters that may be Python >= 3.12, most likely first (not yet checked to work)."""
    if sys.version_info[:2] >= MIN_PYTHON:
        yield sys.executable
    for name in _CANDIDATE_NAMES:
        exe = shutil.which(name)
        if exe:
            yield exe
    for root in _pyenv_roots():
        found = glob.glob(str(root / "versions" / "3.1[2-9]*" / "bin" / "python3.1[2-9]"))
        # the lowest minor first (3.12 has the widest wheel support), its newest patch first
        yield from sorted(found, key=lambda p: (_version_key(p)[:2], -_version_key(p)[2]))
    for name in _FALLBACK_NAMES:  # the default python may itself be recent enough
        exe = shutil.which(name)
        if exe:
            yield exe
    uv = shutil.which("uv")
    if uv:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([uv, "python", "find", ">=3.12"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                yield out.stdout.strip()


def find_python312() -> str | None:
    """The path of a working Python >= 3.12 interpreter (with venv and ensurepip), or None.

    `TOTASK_SDK_PYTHON` names one explicitly. A candidate that works is returned as the
    interpreter reports itself (`sys.executable`), so a pyenv shim resolves to the real binary."""
    override = os.environ.get("TOTASK_SDK_PYTHON")
    candidates = [override] if override else python_candidates()
    seen: set[str] = set()
    for exe in candidates:
        if exe in seen:
            continue
        seen.add(exe)
        found = _probe(exe)
        if found is not None and found[0] >= MIN_PYTHON:
            return found[1] or exe
    return None


def _requirements(extra_packages: Iterable[str]) -> list[str]:
    return [f"{SDK_PACKAGE}=={SDK_VERSION}", *sorted(set(extra_packages))]


def _read_stamp(venv: Path) -> dict | None:
    return venvs.read_stamp(venv / STAMP_NAME)


def _is_ready(venv: Path, requirements: list[str]) -> bool:
    stamp = _read_stamp(venv)
    if not stamp or not venv_python(venv).exists():
        return False
    have = set(stamp.get("requirements", []))
    return set(requirements) <= have


def sdk_venv_ready(
    root: str | Path, extra_packages: Iterable[str] = (), *, venv_dir: str | Path | None = None
) -> Path | None:
    """The python of an already built SDK venv that has everything asked for, else None (no build,
    no interpreter search)."""
    venv = (Path(venv_dir) if venv_dir is not None else Path(root) / VENV_DIR).resolve()
    return venv_python(venv) if _is_ready(venv, _requirements(extra_packages)) else None


def ensure_sdk_venv(
    root: str | Path,
    extra_packages: Iterable[str] = (),
    *,
    python: str | None = None,
    venv_dir: str | Path | None = None,
    lock_timeout_s: float = 1800,
) -> Path:
    """The python of a venv holding `synapse-sdk==2026.2.17` (plus `extra_packages`, pip specs),
    building it under `root/.venv-sdk` (or `venv_dir`) when it is missing or lacks a package.

    Idempotent and safe across processes. Raises `SdkEnvError` when no Python >= 3.12 is found
    (check `find_python312()` first to skip instead) or when venv/pip fail."""
    venv = Path(venv_dir) if venv_dir is not None else Path(root) / VENV_DIR
    venv = venv.resolve()
    reqs = _requirements(extra_packages)
    if _is_ready(venv, reqs):
        return venv_python(venv)
    with venvs.locked(lock_path(venv), lock_timeout_s, SdkEnvError):
        if _is_ready(venv, reqs):  # another process built it while we waited
            return venv_python(venv)
        stamp = _read_stamp(venv)
        py = venv_python(venv)
        if stamp is None or not py.exists() or _probe(str(py)) is None:
            exe = python or find_python312()
            if exe is None:
                raise SdkEnvError("no Python >= 3.12 interpreter found")
            venvs.make_venv(venv, exe, SdkEnvError)
            stamp = None
        wanted = sorted(set(reqs) | set((stamp or {}).get("requirements", [])))
        version = venvs.pip_install(py, reqs, SDK_PACKAGE, SDK_VERSION, PIP_TIMEOUT_S, SdkEnvError)
        venvs.write_stamp(venv / STAMP_NAME, {"requirements": wanted, "synapse_sdk": version})
    return py
