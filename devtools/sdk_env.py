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
  of pip's output.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    if not env.get("PYENV_VERSION"):
        env.pop("PYENV_VERSION", None)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(k, None)
    return env


def _probe(exe: str) -> tuple[tuple[int, int], str] | None:
    """((major, minor), sys.executable) of an interpreter that runs and has venv and ensurepip."""
    code = "import sys, venv, ensurepip; print(sys.version_info[0], sys.version_info[1], sys.executable)"
    try:
        out = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=30, env=_clean_env())
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    m = re.fullmatch(r"(\d+) (\d+) (.+)", out.stdout.strip())
    return ((int(m.group(1)), int(m.group(2))), m.group(3)) if m else None


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


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def lock_path(venv: Path) -> Path:
    """The lock file that serialises builds of `venv`: in the temp dir (not in the work tree,
    where it would show up in git status; not in the venv, which a rebuild deletes)."""
    digest = hashlib.sha256(str(venv.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"totask-sdk-venv-{digest}.lock"


def _requirements(extra_packages: Iterable[str]) -> list[str]:
    return [f"{SDK_PACKAGE}=={SDK_VERSION}", *sorted(set(extra_packages))]


def _read_stamp(venv: Path) -> dict | None:
    try:
        return json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_ready(venv: Path, requirements: list[str]) -> bool:
    stamp = _read_stamp(venv)
    if not stamp or not venv_python(venv).exists():
        return False
    have = set(stamp.get("requirements", []))
    return set(requirements) <= have


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SdkEnvError(
                        f"timed out after {timeout_s:.0f} s waiting for the lock {path}"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, timeout_s: float) -> str:
    try:
        out = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            env=_clean_env() | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or "")[-4000:] if isinstance(exc.stdout, str) else ""
        raise SdkEnvError(f"{what} timed out after {timeout_s:.0f} s:\n{tail}") from None
    if out.returncode != 0:
        tail = "\n".join(out.stdout.splitlines()[-40:])
        raise SdkEnvError(f"{what} failed (exit {out.returncode}):\n{tail}")
    return out.stdout


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
    with _locked(lock_path(venv), lock_timeout_s):
        if _is_ready(venv, reqs):  # another process built it while we waited
            return venv_python(venv)
        stamp = _read_stamp(venv)
        py = venv_python(venv)
        if stamp is None or not py.exists() or _probe(str(py)) is None:
            exe = python or find_python312()
            if exe is None:
                raise SdkEnvError("no Python >= 3.12 interpreter found")
            if venv.exists():
                if any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
                    raise SdkEnvError(f"{venv} exists and is not a virtualenv; not replacing it")
                shutil.rmtree(venv)
            _run([exe, "-m", "venv", str(venv)], f"{exe} -m venv {venv}", 300)
            stamp = None
        wanted = sorted(set(reqs) | set((stamp or {}).get("requirements", [])))
        _run(
            [str(py), "-m", "pip", "install", "--quiet", "--no-input", *reqs],
            f"pip install {' '.join(reqs)}",
            PIP_TIMEOUT_S,
        )
        version = _run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('synapse-sdk'))"],
            "checking the installed synapse-sdk",
            60,
        ).strip()
        if version != SDK_VERSION:
            raise SdkEnvError(f"expected synapse-sdk {SDK_VERSION} in {venv}, found {version}")
        tmp = venv / f"{STAMP_NAME}.tmp"
        tmp.write_text(json.dumps({"requirements": wanted, "synapse_sdk": version}, indent=1))
        os.replace(tmp, venv / STAMP_NAME)
    return py
