"""A real Label Studio server for tests and benchmarks: its own venv, a pre-migrated data dir, a boot
in seconds.

- `ensure_ls_venv(root)` builds `<root>/.venv-ls` with `label-studio==1.23.2` once (its pins clash
  with Ray's, so it never shares a venv with totask-ray); a stamp records it, a lock serialises
  builds across processes (`devtools.venvs`, shared with `devtools.sdk_env`).
- `ls_data_template(root)` migrates a data dir once (33-37 s here), with an admin user, a legacy key
  and a personal access token, and keeps it beside the venv; `LabelStudioServer` copies it to a
  fresh temp dir and boots on 127.0.0.1 in about 4 s.
- Nothing leaves the machine: analytics, Sentry, the version check and resource downloads are
  switched off by environment (tests/label_studio/NOTES.md lists what was checked).

The secrets here are throwaway test values for a server bound to loopback.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from devtools import venvs
from devtools.procs import stop_group
from devtools.venvs import venv_python

LS_PACKAGE = "label-studio"
LS_VERSION = "1.23.2"
VENV_DIR = ".venv-ls"
STAMP_NAME = ".totask-ls-stamp.json"
TEMPLATE_DIR = "data-template"
TEMPLATE_STAMP = "totask-template.json"
PIP_TIMEOUT_S = 1800
USERNAME = "admin@totask.local"
BOOT_TIMEOUT_S = 120.0


class LsEnvError(RuntimeError):
    """The Label Studio venv, data dir or server could not be made (the message ends with the
    tail of the failing output; never a token)."""


def _venv(root: str | Path) -> Path:
    return (Path(root) / VENV_DIR).resolve()


def ls_venv_ready(root: str | Path) -> Path | None:
    """The python of an already built venv, else None (no build)."""
    venv = _venv(root)
    stamp = venvs.read_stamp(venv / STAMP_NAME) or {}
    ok = stamp.get("label_studio") == LS_VERSION and venv_python(venv).exists()
    return venv_python(venv) if ok else None


def ensure_ls_venv(root: str | Path, *, python: str | None = None) -> Path:
    """The python of `<root>/.venv-ls` holding label-studio 1.23.2, built when missing."""
    venv = _venv(root)
    ready = ls_venv_ready(root)
    if ready is not None:
        return ready
    with venvs.locked(_lock(venv), 1800, LsEnvError):
        ready = ls_venv_ready(root)
        if ready is not None:
            return ready
        exe = python or sys.executable
        py = venvs.make_venv(venv, exe, LsEnvError)
        if venvs.probe(str(py)) is None:
            raise LsEnvError(f"the new venv's python {py} does not run")
        spec = f"{LS_PACKAGE}=={LS_VERSION}"
        version = venvs.pip_install(py, [spec], LS_PACKAGE, LS_VERSION, PIP_TIMEOUT_S, LsEnvError)
        venvs.write_stamp(venv / STAMP_NAME, {"label_studio": version})
        return py


def _lock(venv: Path) -> Path:
    return venvs.lock_path(venv, prefix="totask-ls-venv")


def _env(data_dir: Path, secret_key: str, media_root: Path | None = None) -> dict[str, str]:
    env = venvs.clean_env()
    for k in list(env):
        if k.startswith(("LABEL_STUDIO_", "DJANGO_")):
            env.pop(k)
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
        SECRET_KEY=secret_key,
        COLLECT_ANALYTICS="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        LATEST_VERSION_CHECK="false",
        CONVERTER_DOWNLOAD_RESOURCES="false",
        LOCAL_FILES_SERVING_ENABLED="true",
        LOCAL_FILES_DOCUMENT_ROOT=str(media_root or data_dir),
        PYTHONUNBUFFERED="1",
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Credentials:
    legacy_token: str
    personal_token: str
    secret_key: str
    password: str


class LabelStudioServer:
    """`label-studio start` on 127.0.0.1 over a copy of the template data dir; a context manager."""

    def __init__(self, root: str | Path, *, port: int | None = None, data_dir: Path | None = None):
        self.root = Path(root)
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._data_dir = data_dir
        self._tmp: str | None = None
        self._proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.credentials: Credentials | None = None

    @property
    def legacy_token(self) -> str:
        assert self.credentials is not None
        return self.credentials.legacy_token

    @property
    def personal_token(self) -> str:
        assert self.credentials is not None
        return self.credentials.personal_token

    def start(self, *, fresh: bool = False) -> LabelStudioServer:
        py = ensure_ls_venv(self.root)
        if fresh:  # the template itself is being made
            assert self._data_dir is not None and self.credentials is not None
            data = self._data_dir
        else:
            template, self.credentials = ls_data_template(self.root)
            self._tmp = tempfile.mkdtemp(prefix="totask-ls-")
            data = Path(self._tmp) / "data"
            shutil.copytree(template, data)
        creds = self.credentials
        self.log_path = data.parent / f"label-studio-{self.port}.log"
        cmd = [
            str(py.with_name("label-studio")), "start", "--no-browser", "--internal-host", "127.0.0.1",
            "--port", str(self.port), "--data-dir", str(data), "--username", USERNAME,
            "--password", creds.password, "--user-token", creds.legacy_token,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                env=_env(data, creds.secret_key),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_up()
        return self

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        if self.credentials is not None:
            for s in (
                self.credentials.legacy_token,
                self.credentials.personal_token,
                self.credentials.password,
            ):
                text = text.replace(s, "***")
        return "\n".join(text.splitlines()[-30:])

    def _wait_up(self) -> None:
        import httpx

        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LsEnvError(
                    f"label-studio exited with {self._proc.returncode} at start:\n{self._log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if f"port {self.port} is in use" in self._log_tail().lower():
                break  # it would silently move to another port: refuse instead
            time.sleep(0.3)
        self.stop()
        raise LsEnvError(
            f"label-studio did not answer on {self.url} within {BOOT_TIMEOUT_S:.0f} s:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            stop_group(proc, 15)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> LabelStudioServer:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ls_data_template(root: str | Path) -> tuple[Path, Credentials]:
    """The pre-migrated data dir and its credentials, made once (under the venv's lock)."""
    venv = _venv(root)
    template = venv / TEMPLATE_DIR
    stamp = venv / TEMPLATE_STAMP

    def read() -> Credentials | None:
        data = venvs.read_stamp(stamp)
        try:
            return Credentials(**data) if data is not None and template.is_dir() else None
        except TypeError:
            return None

    creds = read()
    if creds is not None:
        return template, creds
    ensure_ls_venv(root)
    with venvs.locked(_lock(venv.with_name(VENV_DIR + "-template")), 600, LsEnvError):
        creds = read()
        if creds is not None:
            return template, creds
        shutil.rmtree(template, ignore_errors=True)
        made = Credentials(
            legacy_token=secrets.token_hex(20),
            personal_token="",
            secret_key=secrets.token_urlsafe(40),
            password=secrets.token_urlsafe(16),
        )
        server = LabelStudioServer(root, data_dir=template)
        server.credentials = made
        server.start(fresh=True)
        try:
            made = Credentials(
                **{**made.__dict__, "personal_token": _personal_token(server.url, made.legacy_token)}
            )
        finally:
            server.stop()
        for log in template.parent.glob("label-studio-*.log"):
            log.unlink(missing_ok=True)
        venvs.write_stamp(stamp, made.__dict__)
        return template, made


def _personal_token(url: str, legacy: str) -> str:
    import httpx

    auth = {"Authorization": f"Token {legacy}"}
    r = httpx.post(
        f"{url}/api/jwt/settings",
        headers=auth,
        json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True},
        timeout=30,
    )
    if r.status_code >= 400:
        raise LsEnvError(f"enabling personal access tokens failed with HTTP {r.status_code}")
    r = httpx.post(f"{url}/api/token/", headers=auth, timeout=30)
    if r.status_code >= 400 or "token" not in r.json():
        raise LsEnvError(f"creating a personal access token failed with HTTP {r.status_code}")
    return str(r.json()["token"])


@contextlib.contextmanager
def bench_server(root: str | Path) -> Iterator[LabelStudioServer]:
    """A server for one benchmark run (the same as the tests'), stopped afterwards."""
    with LabelStudioServer(root) as server:
        yield server


if __name__ == "__main__":
    # `python -m devtools.ls_env <root>`: build the venv and the data template now (the test suite
    # starts this in the background at collection, so the minutes it takes overlap other tests).
    # SIGTERM unwinds (pip is killed, a half-migrated template's server stopped); no stamp is
    # written, so the next build starts afresh.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ls_data_template(sys.argv[1] if len(sys.argv) > 1 else ".")
