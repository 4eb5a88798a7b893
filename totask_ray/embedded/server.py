"""Run the embedded platform: `LocalPlatform` starts it as a separate server process.

The parent binds the listening socket itself (port 0 picks a free port; SO_REUSEADDR lets a
restart take the same port again) and hands it to the child, which serves it with uvicorn (one
worker, uvloop and httptools when available, no access log). The token travels in an environment
variable, never on the command line. The child prints one JSON line `{"event": "ready", "url": ...}`
on stdout when it accepts requests; everything else it says goes to `<data_dir>/server.log`.

`python -m totask_ray.embedded.server` is the child's entry point (see `main`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .store import Store

ENV_TOKEN = "TOTASK_PLATFORM_TOKEN"
ENV_TENANT = "TOTASK_PLATFORM_TENANT"
DB_NAME = "platform.db"
MEDIA_DIR = "media"
LOG_NAME = "server.log"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket with SO_REUSEADDR; port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def load_plugin_runner(spec: str | None) -> Any:
    """`module:attr` → the attribute, called with no arguments when it is a class or function."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"plugin runner must be given as 'module:attr', got {spec!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "deploy")) else obj


def _uvicorn_choices() -> tuple[str, str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def serve(
    data_dir: str | Path,
    *,
    token: str,
    sock: socket.socket,
    tenant: str | None = None,
    latency_ms: float = 0,
    fault_injection: bool = False,
    plugin_runner: Any = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the platform on `sock` in this process until SIGTERM/SIGINT; `on_ready(url)` once
    it accepts requests."""
    import uvicorn

    from .app import create_app

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(data_dir / DB_NAME)
    app = create_app(
        store,
        data_dir / MEDIA_DIR,
        token,
        tenant=tenant,
        latency_ms=latency_ms,
        fault_injection=fault_injection,
        plugin_runner=plugin_runner,
    )
    host, port = sock.getsockname()[:2]
    url = _format_url(host, port)
    loop, http = _uvicorn_choices()
    config = uvicorn.Config(
        app,
        loop=loop,
        http=http,
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=2,
        backlog=2048,
        server_header=False,
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready(url)

    try:
        _Server(config).run(sockets=[sock])
    finally:
        store.close()


def _watch_parent() -> None:
    """Exit when stdin closes (the parent that started us died or closed the pipe)."""

    def watch() -> None:
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """The child process: `python -m totask_ray.embedded.server --data-dir D [--fd N | --host H --port P]`.
    The token comes from the environment variable TOTASK_PLATFORM_TOKEN (the tenant from
    TOTASK_PLATFORM_TENANT)."""
    ap = argparse.ArgumentParser(prog="python -m totask_ray.embedded.server")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--fd", type=int, default=None, help="an inherited, bound socket to serve")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--fault-injection", action="store_true")
    ap.add_argument("--plugin-runner", default=None, help="module:attr of a plugin runner (factory)")
    ap.add_argument("--exit-with-parent", action="store_true", help="exit when stdin reaches EOF")
    args = ap.parse_args(argv)

    token = os.environ.pop(ENV_TOKEN, "")
    tenant = os.environ.pop(ENV_TENANT, "") or None
    if not token:
        print(f"error: set the token in the environment variable {ENV_TOKEN}", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=args.fd) if args.fd is not None else bind_socket(args.host, args.port)
    if args.exit_with_parent:
        _watch_parent()

    def ready(url: str) -> None:
        sys.stdout.write(json.dumps({"event": "ready", "url": url, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        # Nothing else goes to the parent's pipe (it stops reading): later output goes to stderr.
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    serve(
        args.data_dir,
        token=token,
        sock=sock,
        tenant=tenant,
        latency_ms=args.latency_ms,
        fault_injection=args.fault_injection,
        plugin_runner=load_plugin_runner(args.plugin_runner),
        on_ready=ready,
    )
    return 0


_LIVE: weakref.WeakSet[LocalPlatform] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for lp in list(_LIVE):
        with contextlib.suppress(Exception):
            lp.stop()


class LocalPlatform:
    """The embedded Synapse-compatible platform as a separate server process on loopback.

    >>> with LocalPlatform("/tmp/platform") as lp:
    ...     httpx.get(f"{lp.url}/projects/1/", headers=lp.headers)
    """

    def __init__(
        self,
        data_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tenant: str | None = None,
        latency_ms: float = 0,
        fault_injection: bool = False,
        plugin_runner: str | None = None,
        startup_timeout_s: float = 30.0,
    ):
        self.data_dir = Path(data_dir)
        self.media_dir = self.data_dir / MEDIA_DIR
        self.db_path = self.data_dir / DB_NAME
        self.log_path = self.data_dir / LOG_NAME
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(24)
        self.tenant = tenant
        self.latency_ms = latency_ms
        self.fault_injection = fault_injection
        self.plugin_runner = plugin_runner
        self.startup_timeout_s = startup_timeout_s
        self.url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._store: Store | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"LocalPlatform(url={self.url!r}, data_dir={str(self.data_dir)!r})"

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> LocalPlatform:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.media_dir.mkdir(parents=True, exist_ok=True)
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "totask_ray.embedded.server",
            "--data-dir",
            str(self.data_dir),
            "--fd",
            str(sock.fileno()),
            "--latency-ms",
            str(self.latency_ms),
            "--exit-with-parent",
        ]
        if self.fault_injection:
            cmd.append("--fault-injection")
        if self.plugin_runner:
            cmd += ["--plugin-runner", self.plugin_runner]
        env = dict(os.environ)
        env[ENV_TOKEN] = self.token
        if self.tenant:
            env[ENV_TENANT] = self.tenant
        else:
            env.pop(ENV_TENANT, None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                pass_fds=(sock.fileno(),),
                close_fds=True,
            )
        finally:
            sock.close()
            log.close()
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        _LIVE.add(self)
        return self

    def _wait_ready(self) -> str:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout_s
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"the platform did not start within {self.startup_timeout_s:.0f} s; see {self.log_path}"
                    )
                if sel.select(timeout=min(left, 0.5)):
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    buf += chunk
                elif proc.poll() is not None:
                    break
        line = buf.split(b"\n", 1)[0]
        try:
            msg = json.loads(line)
            return str(msg["url"])
        except (ValueError, KeyError, TypeError):
            proc.poll()
            raise RuntimeError(
                f"the platform process exited (code {proc.returncode}) before it was ready:\n{self._log_tail()}"
            ) from None

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the server (SIGTERM), killing it if it has not exited after `timeout_s`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        _LIVE.discard(self)

    def restart(self) -> LocalPlatform:
        """Stop and start again on the same port with the same data (and token)."""
        self.stop()
        return self.start()

    def __enter__(self) -> LocalPlatform:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- conveniences -----------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """A `Store` on the platform's database, in this process (for tests and seeders)."""
        if self._store is None:
            self._store = Store(self.db_path)
        return self._store

    @property
    def headers(self) -> dict[str, str]:
        """The auth headers a client sends."""
        h = {"Synapse-Access-Token": f"Token {self.token}"}
        if self.tenant:
            h["Synapse-Tenant"] = f"Token {self.tenant}"
        return h

    def seed(self, demo: str = "files", **kwargs: Any) -> dict[str, Any]:
        """Run a demo seeder (see `seeds.DEMOS`) on the platform's data, in this process."""
        from .seeds import DEMOS

        return DEMOS[demo](self.store, self.media_dir, **kwargs)

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        if self.url is None:
            raise RuntimeError("the platform is not running; call start() first")
        r = httpx.request(method, f"{self.url}{path}", json=body, headers=self.headers, timeout=30)
        if r.status_code == 404 and path.startswith("/_local/faults/"):
            raise RuntimeError("fault injection is off; start the platform with fault_injection=True")
        r.raise_for_status()
        return r.json()

    def set_faults(self, **cfg: Any) -> dict[str, Any]:
        """Configure injected faults (see `gate.FaultConfig`): error_rate, statuses, retry_after_s,
        slow_rate, slow_s, path_regex, methods, seed, max_in_a_row."""
        return self._admin("POST", "/_local/faults/", cfg)

    def clear_faults(self) -> dict[str, Any]:
        """Stop injecting faults; returns the last configuration and its counters."""
        return self._admin("DELETE", "/_local/faults/")

    def fault_stats(self) -> dict[str, Any]:
        return self._admin("GET", "/_local/faults/")


if __name__ == "__main__":
    sys.exit(main())
