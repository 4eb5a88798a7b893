"""The agent's side of the embedded platform: `plugins/{code}/run/` onto a real Ray cluster.

`RayPluginRunner` implements `runner.PluginRunner` inside the platform's server process, so the public
synapse-sdk ToTask action (or ours) can drive a pre-processor end to end against the embedded
platform:

- `action: deployment` runs the lifecycle of `totask-ray serve deploy` (`serving.lifecycle.ensure_running`:
  detect, capacity gate, non-blocking dispatch, wait) with the dispatch payload's resources, on a
  worker thread so that the event loop keeps answering. The request returns once the app is
  dispatched (or found running); a capacity verdict of `never_fits` answers 400 with its message.
  Whatever `ReleaseConfig.deploy_target` deploys is deployed: totask-ray's `actions.deployment`, or
  the entrypoint on `actions.inference` of a release in the Synapse SDK's shape.
- `serve_applications` rows mirror the real Serve status: DEPLOYING at dispatch, then whatever
  `serve.status()` says (RUNNING, DEPLOY_FAILED, UNHEALTHY, ...), kept up to date by a background
  monitor after the deployment settled; an app that disappeared from the cluster goes back to
  NOT_STARTED. One row per (app, agent) is reused across redeploys: a stale DEPLOY_FAILED row next
  to a new DEPLOYING one would make the reference action fail at once (failed beats pending).
- `action: inference` POSTs `params.json` to Serve's HTTP proxy at the app's route prefix
  (`/` + md5(`code@version`), then `/`) and answers with the app's JSON.

The platform loads runners as `module:factory` called with no arguments (see
`server.load_plugin_runner`), so `ray_plugin_runner` reads its settings from the environment, which
the platform's process inherits from whoever starts `LocalPlatform`:

- `TOTASK_PLATFORM_RAY_ADDRESS`: the cluster to attach to (a GCS address such as
  `127.0.0.1:6379`); else `RAY_ADDRESS`; else `auto` (the cluster running on this machine).
- `TOTASK_PLATFORM_SERVE_PORT`: the port Serve's proxy gets if this runner has to start Serve
  (default 8000, always on 127.0.0.1); when Serve runs already, its own port is read back.
- `TOTASK_PLATFORM_DEPLOY_TIMEOUT_S` (600), `TOTASK_PLATFORM_INFER_TIMEOUT_S` (60).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from totask_ray.serving.capacity import CapacityError
from totask_ray.serving.config import PreProcessorRelease, ReleaseConfigError, parse_release_config
from totask_ray.serving.lifecycle import RayServeBackend, classify_serve_status, ensure_running, route_prefix
from totask_ray.serving.resources import Resources

from .runner import PluginRunError
from .store import SERVE_STATUSES, Store

__all__ = [
    "ENV_DEPLOY_TIMEOUT",
    "ENV_INFER_TIMEOUT",
    "ENV_RAY_ADDRESS",
    "ENV_SERVE_PORT",
    "PlatformRayBackend",
    "RayPluginRunner",
    "ray_plugin_runner",
]

log = logging.getLogger(__name__)

ENV_RAY_ADDRESS = "TOTASK_PLATFORM_RAY_ADDRESS"
ENV_SERVE_PORT = "TOTASK_PLATFORM_SERVE_PORT"
ENV_DEPLOY_TIMEOUT = "TOTASK_PLATFORM_DEPLOY_TIMEOUT_S"
ENV_INFER_TIMEOUT = "TOTASK_PLATFORM_INFER_TIMEOUT_S"
DEFAULT_SERVE_PORT = 8000
GONE = "NOT_STARTED"  # what a row says once its app is no longer on the cluster
PLATFORM_HOST = "127.0.0.1"  # where the embedded platform serves, and so what its media URLs name


class _Closing(BaseException):
    """Raised inside a lifecycle thread when the runner shuts down (not an Exception, so the
    lifecycle's "a failed status read is just another pending poll" does not swallow it)."""


# -- the Ray side ---------------------------------------------------------------------------------


class PlatformRayBackend(RayServeBackend):
    """`RayServeBackend` plus what the platform needs: attach to a given cluster as a second
    driver, and find Serve's HTTP port."""

    def __init__(self, address: str | None, *, serve_port: int = DEFAULT_SERVE_PORT) -> None:
        super().__init__(address, http_options={"host": "127.0.0.1", "port": serve_port})
        self._connect_lock = threading.Lock()

    def connect(self) -> None:
        """Attach once; the monitor and a first deploy may race here from two threads."""
        import ray

        with self._connect_lock:
            if ray.is_initialized():
                return
            ray.init(
                address=self.address or "auto",
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
                # Serve apps inherit the deploying driver's runtime env: no usage reports from them.
                runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
            )

    def _connect(self) -> None:
        self.connect()

    def http_port(self) -> int | None:
        """The port of the running Serve proxy, or None when Serve is not running."""
        from ray.serve.context import _get_global_client

        self.connect()
        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else int(client.http_config.port)


# -- bookkeeping ----------------------------------------------------------------------------------


@dataclass
class _Deploy:
    """One lifecycle run in flight; later deploy calls for the same app join it."""

    app_name: str
    rows: set[int]
    jobs: list[int]
    started: asyncio.Event  # set once dispatched, or when the run ended without dispatching
    future: asyncio.Future | None = None
    settled: bool = False  # the run ended and its jobs were closed


@dataclass
class _Tracked:
    rows: set[int] = field(default_factory=set)
    seen: bool = False  # the app was on the cluster at least once since tracking began


def _app_status(raw: Any) -> str | None:
    """The app-level status in a `RayServeBackend.status` answer (None when the app is absent)."""
    if isinstance(raw, list) and raw and isinstance(raw[0], Mapping):
        value = raw[0].get("status")
        return value if value in SERVE_STATUSES else None
    return None


def _deployed_action(actions: Mapping[str, Any]) -> str | None:
    """Which action's entrypoint is deployed, picked as `ReleaseConfig.deploy_target` picks it (on the
    raw config: the payload's resources and the platform's host go in before it is parsed):
    `deployment` for totask-ray's apps, `inference` for a release in the Synapse SDK's shape."""
    if isinstance(actions.get("deployment"), Mapping):
        return "deployment"
    inference = actions.get("inference")
    if isinstance(inference, Mapping) and inference.get("entrypoint"):
        return "inference"
    return None


def _release_with_payload(release: Mapping[str, Any], params: Mapping[str, Any]) -> PreProcessorRelease:
    """The stored release, with the dispatch payload's resources in place of the declared ones (the
    payload is what the caller asked for; an empty payload keeps the release's own).

    It may import the release's entrypoint module (see `_allow_platform_media`): call it off the loop.
    """
    config = dict(release.get("config") or {})
    if params:
        try:
            res = Resources.from_payload(params)
        except Exception as exc:
            raise PluginRunError(400, f"Invalid deployment params: {_short(exc)}") from None
        actions = dict(config.get("actions") or {})
        inference = dict(actions.get("inference") or {})
        actions["inference"] = inference
        required: dict[str, Any] = {"required_cpu_count": res.num_cpus, "required_gpu_count": res.num_gpus}
        if res.num_replicas is not None:
            required["num_replicas"] = res.num_replicas
            kind = _deployed_action(actions)
            if kind is not None:  # the payload's count wins over the deployed action's own
                target = inference if kind == "inference" else dict(actions[kind])
                serve_options = dict(target.get("serve_options") or {})
                serve_options.pop("num_replicas", None)
                target["serve_options"] = serve_options
                actions[kind] = target
        if res.memory is not None:
            required["memory"] = res.memory
        inference["required_resources"] = required
        config["actions"] = actions
    _allow_platform_media(config)
    try:
        cfg = parse_release_config(config, source=f"plugin release {release.get('id')}")
        rel = PreProcessorRelease(
            id=release.get("id"), code=release["plugin"], version=release["version"], config=cfg
        )
    except ReleaseConfigError as exc:
        raise PluginRunError(400, str(exc)) from None
    except Exception as exc:
        raise PluginRunError(400, f"Invalid plugin release: {_short(exc)}") from None
    if cfg.deploy_target is None:
        raise PluginRunError(
            400,
            f"{rel.app_name} declares no actions.deployment.entrypoint (nor actions.inference.entrypoint, "
            "as the Synapse SDK writes it); it cannot be deployed",
        )
    return rel


def _allow_platform_media(config: dict[str, Any]) -> None:
    """Inference requests name this platform's own signed media URLs, on loopback, which an app's
    image fetch refuses unless its host is allow-listed: add it to the app's `allowed_hosts`.

    Only where `options` reach that fetch (`serving.deployment.FetchOptions`): always for
    `actions.deployment` (totask-ray's apps); on `actions.inference` they are the constructor
    arguments of an SDK-style class, which fetches `image_path` its own way and would refuse an
    unknown keyword, so the host is added there only for a builder or a class that names it.
    """
    actions = dict(config.get("actions") or {})
    kind = _deployed_action(actions)
    if kind is None:
        return  # nothing to deploy: refused just below, with its own message
    target = actions[kind]
    if kind == "inference" and not _fetches_under_policy(str(target["entrypoint"])):
        return
    options = dict(target.get("options") or {})
    hosts = options.get("allowed_hosts", [])
    if isinstance(hosts, list) and PLATFORM_HOST not in hosts:  # anything else: the app says what is wrong
        options["allowed_hosts"] = [*hosts, PLATFORM_HOST]
    actions[kind] = {**target, "options": options}
    config["actions"] = actions


def _fetches_under_policy(entrypoint: str) -> bool:
    """Whether an `actions.inference` entrypoint takes `allowed_hosts` in its options: a builder
    (`build_app(args)`, whose options go to `FetchOptions`) or a class whose constructor names it.
    One that cannot be imported here is left to the dispatch, which says why."""
    import importlib
    import inspect

    module, _, attr = entrypoint.partition(":")
    try:
        entry = getattr(importlib.import_module(module), attr)
        cls = getattr(entry, "func_or_class", entry)  # a @serve.deployment class
        if not inspect.isclass(cls):
            return callable(cls)
        return "allowed_hosts" in inspect.signature(cls).parameters
    except Exception:
        return False


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the runner -----------------------------------------------------------------------------------


class RayPluginRunner:
    """See the module docstring. `backend` is injectable for tests (anything with the
    `ServeBackend` methods plus `list_applications()`, `connect()` and `http_port()`)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        backend: Any = None,
        serve_port: int = DEFAULT_SERVE_PORT,
        poll_interval_s: float = 0.5,
        monitor_interval_s: float = 2.0,
        deploy_timeout_s: float = 600.0,
        infer_timeout_s: float = 60.0,
        threads: int = 8,
    ) -> None:
        self.backend: Any = (
            backend if backend is not None else PlatformRayBackend(address, serve_port=serve_port)
        )
        self.poll_interval_s = poll_interval_s
        self.monitor_interval_s = monitor_interval_s
        self.deploy_timeout_s = deploy_timeout_s
        self.infer_timeout_s = infer_timeout_s
        self.store: Store | None = None
        # Ray calls block (and the lifecycle sleeps between polls): they run here, never on the loop.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ray-runner")
        self._inflight: dict[str, _Deploy] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._monitor: asyncio.Task | None = None
        self._http: Any = None
        self._port: int | None = None
        self._closing = False
        self._signals_rearmed = False
        self._rows_lock = threading.Lock()

    # -- plumbing --

    def attach(self, store: Store) -> None:
        """Called once at the platform's startup: remember the store, adopt the rows it already has
        (their status is re-read from the cluster), and start the monitor (which connects to Ray
        in the background, so the first deploy does not pay for it)."""
        self.store = store
        _, rows = store.list_serve_applications(limit=1_000_000)
        for row in rows:
            if row["name"] and "@" in row["name"]:
                tracked = self._tracked.setdefault(row["name"], _Tracked())
                tracked.rows.add(row["id"])
                tracked.seen = True
        with contextlib.suppress(RuntimeError):  # no running loop: started by the first deploy
            self._ensure_monitor()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connect(self) -> None:
        connect = getattr(self.backend, "connect", None)
        if connect is not None:
            connect()

    async def _connected(self) -> None:
        """Connect (on a worker thread), then give the server its signal handlers back.

        Attaching a driver installs Ray's C++ failure-signal handler, which dumps a stack on SIGTERM
        and kills the process: uvicorn's graceful shutdown (and `aclose`) would never run. The
        Python-level handlers are still registered, so re-installing them on the main thread
        restores them."""
        await self._call(self._connect)
        if not self._signals_rearmed and threading.current_thread() is threading.main_thread():
            self._signals_rearmed = True
            for sig in (signal.SIGTERM, signal.SIGINT):
                handler = signal.getsignal(sig)
                if handler is not None:
                    signal.signal(sig, handler)

    def _ensure_monitor(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    async def aclose(self) -> None:
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(BaseException):
                await self._monitor
        if self._http is not None:
            await self._http.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _store(self) -> Store:
        if self.store is None:
            raise PluginRunError(503, "The plugin runner is not attached to the platform's store.")
        return self.store

    # -- serve_applications rows --

    def _row_for(
        self, rel: PreProcessorRelease, agent_id: int | None, job_id: int, status: str | None = "DEPLOYING"
    ) -> int:
        """The row of this app for this agent, reused across deploys (created when missing), now
        pointing at `job_id`; its status set to `status`, or left as it is when None."""
        store = self._store()
        with self._rows_lock:  # the loop and a lifecycle thread may both look for the row
            return self._row_locked(store, rel, agent_id, job_id, status)

    def _row_locked(
        self, store: Store, rel: PreProcessorRelease, agent_id: int | None, job_id: int, status: str | None
    ) -> int:
        _, rows = store.list_serve_applications(name=rel.app_name, limit=1_000)
        same = [r for r in rows if r["agent"] == agent_id and r["plugin_release"] == rel.id]
        if same:
            row_id = int(same[-1]["id"])
            store.set_serve_application_status(
                row_id, status or same[-1]["status"], job_id=job_id, route_prefix=rel.route_prefix
            )
        else:
            row_id = store.create_serve_application(
                rel.app_name,
                plugin_release_id=None if rel.id is None else int(rel.id),
                plugin_code=rel.code,
                version=rel.version,
                status=status or "DEPLOYING",
                agent_id=agent_id,
                job_id=job_id,
                route_prefix=rel.route_prefix,
            )
        self._tracked.setdefault(rel.app_name, _Tracked()).rows.add(row_id)
        return row_id

    def _record(self, app_name: str, status: str | None) -> None:
        """Write the app's real status to its rows (only when it changed). `None` = not on the cluster."""
        tracked = self._tracked.get(app_name)
        if tracked is None or self.store is None:
            return
        if status is not None and status not in SERVE_STATUSES:
            log.warning("unknown Serve status %r for %s; rows left as they are", status, app_name)
            return
        if status is None:
            if not tracked.seen:
                return  # not there yet (just dispatched) or never was: leave the rows as they are
            status = GONE
        else:
            tracked.seen = True
        for row_id in list(tracked.rows):
            row = self.store.get_serve_application(row_id)
            if row is None:
                tracked.rows.discard(row_id)
            elif row["status"] != status:
                self.store.set_serve_application_status(row_id, status)
        if status == GONE:
            tracked.seen = False  # a later dispatch starts over

    async def _monitor_loop(self) -> None:
        """Keep rows in line with the cluster once no lifecycle run is watching them (UNHEALTHY
        after RUNNING, apps deleted behind the platform's back, ...)."""
        delay = self.monitor_interval_s
        while not self._closing:
            try:
                await self._connected()
                if self._tracked:
                    apps: dict[str, str] = await self._call(self.backend.list_applications)
                    for name in list(self._tracked):
                        if name not in self._inflight:
                            self._record(name, apps.get(name))
                delay = self.monitor_interval_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the cluster may be down for a while: say so, back off
                log.warning("serve status poll failed (%s); retrying", _short(exc))
                delay = min(30.0, delay * 2)
            await asyncio.sleep(delay)

    # -- deployment --

    async def deploy(self, release: dict, params: dict, agent: dict | None, job_id: int) -> dict:
        store = self._store()
        self._ensure_monitor()
        rel = await self._call(_release_with_payload, release, params)
        agent_id = None if agent is None else int(agent["id"])
        name = rel.app_name

        run = self._inflight.get(name)
        joined = run is not None
        if run is None:
            run = _Deploy(name, set(), [job_id], asyncio.Event())
            self._inflight[name] = run  # before any await: a concurrent call must find it
            try:
                await self._connected()
            except Exception as exc:
                self._inflight.pop(name, None)
                run.started.set()
                raise PluginRunError(503, f"Cannot reach the Ray cluster: {_short(exc)}") from None
            loop = asyncio.get_running_loop()
            backend = _RecordingBackend(self, run, rel, agent_id, job_id, loop)
            run.future = loop.run_in_executor(self._pool, self._lifecycle, rel, backend)
            run.future.add_done_callback(lambda fut: self._settle(run, rel, fut))
        else:  # join the run in flight instead of dispatching twice
            run.jobs.append(job_id)
        # Answer once the app is dispatched, or the run ended first (found running, or refused).
        await run.started.wait()
        fut = run.future
        if fut is None:  # the first caller could not connect
            raise PluginRunError(503, "Cannot reach the Ray cluster.")
        if fut.done():
            exc = None if fut.cancelled() else fut.exception()
            if isinstance(exc, CapacityError):
                raise PluginRunError(400, str(exc))
            if isinstance(exc, PluginRunError):
                raise exc
            if exc is not None:
                status = 502 if "dispatch failed" in str(exc) else 503
                raise PluginRunError(status, self._explain(exc))
        # From here to the return nothing awaits, so the run cannot settle in between: the store
        # calls are short (the app makes the same ones on the loop).
        if run.settled:  # found running (or became so already)
            row_id = self._row_for(rel, agent_id, job_id, "RUNNING")
            dispatched = bool(getattr(fut.result(), "started", False)) and not joined
            return self._answer(rel, row_id, "RUNNING", dispatched=dispatched, joined=joined)
        row_id = self._row_for(rel, agent_id, job_id, None)
        run.rows.add(row_id)
        store.update_job(job_id, status="RUNNING")
        row = store.get_serve_application(row_id)
        status = row["status"] if row else "DEPLOYING"
        return self._answer(rel, row_id, status, dispatched=not joined, joined=joined)

    def _lifecycle(self, rel: PreProcessorRelease, backend: _RecordingBackend) -> Any:
        return ensure_running(
            rel, backend, poll_interval_s=self.poll_interval_s, timeout_s=self.deploy_timeout_s
        )

    def _answer(self, rel: PreProcessorRelease, row_id: int | None, status: str, **extra: Any) -> dict:
        return {
            "serve_application": row_id,
            "name": rel.app_name,
            "route_prefix": rel.route_prefix,
            "status": status,
            **extra,
        }

    @staticmethod
    def _explain(exc: BaseException) -> str:
        """The lifecycle's fixed message, plus the backend's own first line when there is one."""
        cause = exc.__cause__
        if cause is None:
            return str(exc)
        detail = str(cause).strip().splitlines()
        return f"{exc}: {_short(detail[-1] if detail else type(cause).__name__)}"

    def _settle(self, run: _Deploy, rel: PreProcessorRelease, fut: asyncio.Future) -> None:
        """The lifecycle run ended (on the loop): close its jobs, then wake the callers."""
        self._inflight.pop(run.app_name, None)
        run.settled = True
        try:
            exc = None if fut.cancelled() else fut.exception()
            if not fut.cancelled() and not isinstance(exc, _Closing):
                self._finish(run, rel, None if exc else fut.result(), exc)
        finally:
            run.started.set()

    def _finish(self, run: _Deploy, rel: PreProcessorRelease, result: Any, exc: BaseException | None) -> None:
        """Close the jobs of a lifecycle run and leave its rows on the last real status."""
        store = self.store
        if store is None:
            return
        if exc is None:
            self._record(rel.app_name, "RUNNING")
            outcome = {
                "serve_application": sorted(run.rows),
                "name": rel.app_name,
                "route_prefix": rel.route_prefix,
                "status": "RUNNING",
                "dispatched": bool(getattr(result, "started", False)),
                "elapsed_s": round(float(getattr(result, "elapsed_s", 0.0)), 3),
            }
            capacity = getattr(result, "capacity", None)
            if capacity is not None:
                outcome["capacity"] = {"verdict": str(capacity.verdict), "message": capacity.message}
            for job in run.jobs:
                store.update_job(job, status="SUCCEEDED", result=outcome)
            store.add_logs(
                [{"event": "deployment", "data": outcome, "job": j, "level": "info"} for j in run.jobs]
            )
            return
        message = self._explain(exc)
        for job in run.jobs:
            store.update_job(job, status="FAILED", result={"error": message, "name": rel.app_name})
        store.add_logs(
            [
                {"event": "deployment", "data": {"error": message}, "job": j, "level": "error"}
                for j in run.jobs
            ]
        )
        if "dispatch failed" in str(exc):
            for row_id in run.rows:
                store.set_serve_application_status(row_id, "DEPLOY_FAILED")

    # -- inference --

    async def _serve_port(self, refresh: bool = False) -> int:
        if self._port is None or refresh:
            try:
                port = await self._call(self.backend.http_port)
            except Exception as exc:
                raise PluginRunError(503, f"Cannot reach the Ray cluster: {_short(exc)}") from None
            if port is None:
                raise PluginRunError(
                    503, "Ray Serve is not running on the cluster; dispatch action 'deployment' first."
                )
            self._port = int(port)
        return self._port

    async def _not_served(self, name: str) -> PluginRunError:
        """Why the proxy had nothing at the route: ask the cluster, not the rows."""
        try:
            raw = await self._call(self.backend.status, name)
        except Exception:
            raw = None
        status = _app_status(raw)
        if status is None:
            return PluginRunError(
                409, f"Pre-processor {name} is not deployed; dispatch action 'deployment' first."
            )
        bucket, _ = classify_serve_status(status)
        if bucket == "pending":
            return PluginRunError(503, f"Pre-processor {name} is not ready yet ({status}).")
        return PluginRunError(502, f"Pre-processor {name} is not serving ({status}).")

    async def infer(self, release: dict, body: dict) -> Any:
        import httpx

        params = body.get("params") or {}
        method = str(params.get("method") or "post").lower()
        if method != "post":
            raise PluginRunError(400, f'Only "method": "post" is supported for inference, got {method!r}.')
        payload = params.get("json")
        if not isinstance(payload, dict):
            raise PluginRunError(400, 'params.json must be a JSON object, e.g. {"image_path": <url>}.')
        name = f"{release['plugin']}@{release['version']}"
        prefix = route_prefix(release["plugin"], release["version"])
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.infer_timeout_s)
        port = await self._serve_port()
        for attempt in (0, 1):
            try:
                # With the slash: a FastAPI app's `POST /` answers the bare prefix with a redirect.
                resp = await self._http.post(f"http://127.0.0.1:{port}{prefix}/", json=payload)
                break
            except httpx.TimeoutException:
                raise PluginRunError(
                    504, f"Pre-processor {name} did not answer within {self.infer_timeout_s:g} s."
                ) from None
            except httpx.TransportError:
                if attempt:
                    raise PluginRunError(
                        503, f"Ray Serve's HTTP proxy (127.0.0.1:{port}) is not reachable."
                    ) from None
                port = await self._serve_port(refresh=True)  # Serve may have restarted elsewhere
        if resp.status_code in (404, 503) and resp.headers.get("content-type", "").startswith("text/"):
            raise await self._not_served(name)  # the proxy's own answer: no app (yet) at this route
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if resp.status_code >= 500:
            raise PluginRunError(502, f"Pre-processor {name} failed (HTTP {resp.status_code}).")
        if resp.status_code >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise PluginRunError(
                400 if resp.status_code < 500 else 502,
                f"Pre-processor {name} rejected the request: {_short(error or resp.text or resp.reason_phrase)}",
            )
        if answer is None:
            raise PluginRunError(502, f"Pre-processor {name} answered with something that is not JSON.")
        return answer


class _RecordingBackend:
    """Wraps the runner's backend for one lifecycle run: every status poll is written to the rows,
    and the row is created (DEPLOYING) just before dispatch or when the app is found running, so
    a refused dispatch (never_fits, bad params) leaves no row behind."""

    def __init__(
        self,
        runner: RayPluginRunner,
        run: _Deploy,
        rel: PreProcessorRelease,
        agent_id: int | None,
        job_id: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.runner = runner
        self.run = run
        self.rel = rel
        self.agent_id = agent_id
        self.job_id = job_id
        self.loop = loop

    def _ensure_row(self) -> None:
        if not self.run.rows:
            self.run.rows.add(self.runner._row_for(self.rel, self.agent_id, self.job_id))

    def status(self, app_name: str) -> Any:
        if self.runner._closing:
            raise _Closing
        raw = self.runner.backend.status(app_name)
        status = _app_status(raw)
        if status == "RUNNING" or self.run.rows:
            self._ensure_row()
            self.runner._record(app_name, status)
        return raw

    def cluster_snapshot(self) -> Any:
        fn = getattr(self.runner.backend, "cluster_snapshot", None)
        return None if fn is None else fn()

    def dispatch(self, release: PreProcessorRelease, payload: Mapping[str, Any]) -> Any:
        self._ensure_row()
        tracked = self.runner._tracked.get(release.app_name)
        if tracked is not None:
            tracked.seen = False  # the app may be absent for a moment: not "gone"
        out = self.runner.backend.dispatch(release, payload)
        # Only a dispatch that went through answers the request early; a failing one ends the
        # lifecycle run with an error, which the request reports itself.
        self.loop.call_soon_threadsafe(self.run.started.set)
        return out

    def delete(self, app_name: str) -> bool:
        return bool(self.runner.backend.delete(app_name))


def ray_plugin_runner(
    address: str | None = None,
    *,
    serve_port: int | None = None,
    deploy_timeout_s: float | None = None,
    infer_timeout_s: float | None = None,
) -> RayPluginRunner:
    """The factory `LocalPlatform(plugin_runner="totask_ray.embedded.ray_runner:ray_plugin_runner")`
    loads. The platform calls it with no arguments, so every setting falls back to the environment
    (see the module docstring); arguments win when a caller passes them."""
    env = os.environ
    return RayPluginRunner(
        address or env.get(ENV_RAY_ADDRESS) or env.get("RAY_ADDRESS") or None,
        serve_port=serve_port or int(env.get(ENV_SERVE_PORT) or DEFAULT_SERVE_PORT),
        deploy_timeout_s=deploy_timeout_s or float(env.get(ENV_DEPLOY_TIMEOUT) or 600.0),
        infer_timeout_s=infer_timeout_s or float(env.get(ENV_INFER_TIMEOUT) or 60.0),
    )
