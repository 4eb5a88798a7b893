"""What every bench shares: the embedded platform, seeding, Ray, the SDK venv, timers, CPU and load
sampling, medians and tables.

Conventions (see BENCHMARKS.md):
- contenders of one bench run in the SAME invocation, interleaved run by run (run 1 of every
  contender, then run 2 of every contender, ...), so a burst of load from another process on this
  shared machine hits every contender alike; tables show medians;
- every figure is printed with the machine's load average seen during the runs and, where it
  matters, the CPU share (CPU seconds per wall second, 1.00 = one core) of each process group;
- nothing here changes product code or settings: contenders run with their defaults unless a row
  says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as _platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Before anything imports ray: no usage reporting, no stray cluster, no Data progress bars.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
for _var in (
    "SYNAPSE_HOST",
    "SYNAPSE_ACCESS_TOKEN",
    "SYNAPSE_PLUGIN_RUN_USER_TOKEN",
    "SYNAPSE_PLUGIN_RUN_TENANT",
):
    os.environ.pop(_var, None)

import psutil  # noqa: E402 - after the environment above

ROOT = Path(__file__).resolve().parents[1]
SDK_SCRIPT_DIR = ROOT / "tests" / "sdk_conformance"
FILE_TARGET_SPEC = "annotation_data"


# -- numbers and tables ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v != v:  # nan
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (pipes), readable in a terminal and pasteable into BENCHMARKS.md."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(f"\n{title}\n")
    for k, r in enumerate(cells):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )
        if k == 0:
            lines.append(
                "|"
                + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths))
                + "|"
            )
    return "\n".join(lines)


def target_line(
    name: str, value: float | None, op: str, goal: float, unit: str = ""
) -> tuple[str, bool | None]:
    """`(text, met)`; met is None when the value could not be measured."""
    if value is None or value != value:
        return f"{name}: n/a (target {op} {goal:g}{unit})", None
    met = value >= goal if op == ">=" else value <= goal
    return f"{name}: {value:.2f}{unit} (target {op} {goal:g}{unit}) -> {'MET' if met else 'MISSED'}", met


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the machine, its load, CPU shares ------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import ray

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit, dirty = "", []
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        dirty = sorted(
            ln[3:] for ln in status.splitlines() if ln[3:].startswith(("totask_ray/", "serve_apps/"))
        )
    return {
        "commit": commit,
        # product files changed in the working tree (others work in this checkout): the numbers
        # are for the tree as it was, not for the commit alone
        "product_files_changed": dirty,
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": _platform.python_version(),
        "ray": ray.__version__,
        "kernel": _platform.release(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


class LoadSampler:
    """The 1-minute load average and the whole machine's busy cores, sampled every few seconds."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu0: Any = None
        self._t0 = 0.0

    def start(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._cpu0, self._t0 = psutil.cpu_times(), time.monotonic()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(os.getloadavg()[0])
        return self.summary()

    def summary(self) -> dict[str, Any]:
        s = self.samples
        busy = None
        if self._cpu0 is not None:
            c1 = psutil.cpu_times()
            idle = (c1.idle + getattr(c1, "iowait", 0)) - (self._cpu0.idle + getattr(self._cpu0, "iowait", 0))
            total = sum(c1) - sum(self._cpu0)
            busy = round((1 - idle / total) * (os.cpu_count() or 1), 2) if total > 0 else None
        return {
            "load1_min": round(min(s), 2) if s else None,
            "load1_median": round(statistics.median(s), 2) if s else None,
            "load1_max": round(max(s), 2) if s else None,
            "machine_busy_cores": busy,
        }

    def text(self) -> str:
        s = self.summary()
        return (
            f"load average (1 min) during the runs: min {s['load1_min']}, median {s['load1_median']}, "
            f"max {s['load1_max']}; machine busy {s['machine_busy_cores']} of {os.cpu_count()} cores on average"
        )


def _cpu_s(p: psutil.Process) -> float | None:
    try:
        t = p.cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class CpuMeter:
    """CPU seconds per wall second of process groups over an interval.

    `groups` maps a name to a function returning the pids of that group *now*; the set is re-read
    on every sample (every `every_s`), so processes that start and end inside the interval (Ray Data
    actors) are counted up to their last sample.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]], every_s: float = 0.5):
        self.groups = groups
        self.every_s = every_s
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._group_of: dict[int, str] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._t1 = 0.0

    def _sample(self) -> None:
        for name, pids in self.groups.items():
            try:
                current = pids()
            except Exception:
                continue
            for pid in current:
                p = self._procs.get(pid)
                if p is None:
                    try:
                        p = self._procs[pid] = psutil.Process(pid)
                    except psutil.NoSuchProcess:
                        continue
                v = _cpu_s(p)
                if v is None:
                    continue
                self._group_of.setdefault(pid, name)
                self._first.setdefault(pid, v)
                self._last[pid] = v

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._t1 = time.monotonic()

    def add(self, name: str, cpu_seconds: float) -> None:
        """Add CPU time measured another way (e.g. a waited-for child's rusage)."""
        self._group_of[-len(self._group_of) - 1] = name
        self._first[-len(self._first) - 1] = 0.0
        self._last[-len(self._last) - 1] = cpu_seconds

    def shares(self) -> dict[str, float]:
        wall = max(self._t1 - self._t0, 1e-9)
        out: dict[str, float] = {name: 0.0 for name in self.groups}
        for pid, last in self._last.items():
            g = self._group_of.get(pid)
            if g is not None:
                out[g] = out.get(g, 0.0) + (last - self._first.get(pid, last))
        return {k: round(v / wall, 2) for k, v in out.items()}


def descendants(exclude: Callable[[], set[int]] = set) -> list[int]:
    """Pids of this process's descendants (Ray's raylet, GCS, workers and actors when Ray was
    started here), minus `exclude()` (processes without children of their own: the platform).
    One /proc walk per call: cheap enough to run twice a second inside the measured driver."""
    skip = exclude()
    try:
        return [k.pid for k in psutil.Process().children(recursive=True) if k.pid not in skip]
    except psutil.NoSuchProcess:
        return []


def fmt_shares(shares: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in shares.items())


# -- the platform ---------------------------------------------------------------------------------


@dataclass
class BenchPlatform:
    """A running embedded platform and what the bench seeded on it."""

    lp: Any
    tmp: Path
    seeded: dict[str, Any] = field(default_factory=dict)
    agent: int | None = None

    @property
    def store(self) -> Any:
        return self.lp.store

    @property
    def url(self) -> str:
        return self.lp.url

    @property
    def token(self) -> str:
        return self.lp.token

    def config(self) -> Any:
        from totask_ray.platform.synapse.client import SynapseConfig

        return SynapseConfig(host=self.lp.url, access_token=self.lp.token)

    @property
    def project(self) -> int:
        return int(self.seeded["project"])

    @property
    def task_ids(self) -> list[int]:
        ids = self.seeded["task_ids"]
        return list(range(ids["first"], ids["last"] + 1))

    def pid_list(self) -> list[int]:
        return [self.lp.pid] if self.lp.pid else []


@contextlib.contextmanager
def platform(
    latency_ms: float = 0, tmp: Path | None = None, plugin_runner: str | None = None
) -> Iterator[BenchPlatform]:
    from totask_ray.embedded.server import LocalPlatform

    with contextlib.ExitStack() as stack:
        if tmp is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="totask-bench-")))
        lp = LocalPlatform(tmp / "platform", latency_ms=latency_ms, plugin_runner=plugin_runner)
        lp.start()
        stack.callback(lp.stop)
        stack.callback(lambda: lp._store.close() if lp._store is not None else None)
        bp = BenchPlatform(lp=lp, tmp=tmp)
        bp.agent = lp.store.create_agent("bench")
        yield bp


def seed_files(bp: BenchPlatform, tasks: int, seed: int = 0) -> float:
    """Seed the files demo (one task per data unit, each with its own annotation JSON); seconds taken."""
    from totask_ray.embedded.seeds import seed_files_demo

    t0 = time.perf_counter()
    bp.seeded = seed_files_demo(bp.store, bp.lp.media_dir, tasks=tasks, seed=seed)
    return time.perf_counter() - t0


def clear_task_data(store: Any, project: int) -> None:
    """Every task of the project back to no data, so each contender writes every task: totask-ray
    compares before it writes and would otherwise find an earlier contender's data already there."""
    with store.transaction() as conn:
        conn.execute("UPDATE tasks SET data = '{}' WHERE project_id = ?", (project,))


def history_watermark(store: Any) -> int:
    row = store._one("SELECT COALESCE(MAX(id), 0) FROM annotation_history")
    return int(row[0])


def writes_since(store: Any, watermark: int) -> list[tuple[int, float]]:
    """(task_id, epoch seconds) of every annotation written after `watermark`, in write order."""
    rows = store._all(
        "SELECT task_id, created_at FROM annotation_history WHERE id > ? ORDER BY id", (watermark,)
    )
    return [(int(t), _epoch(c)) for t, c in rows]


def first_write_after(store: Any, watermark: int) -> float | None:
    row = store._one(
        "SELECT created_at FROM annotation_history WHERE id > ? ORDER BY id LIMIT 1", (watermark,)
    )
    return None if row is None else _epoch(row[0])


def _epoch(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def steady_rate(times: Sequence[float], lo: float = 0.1, hi: float = 0.9) -> float | None:
    """Writes per second between the `lo` and `hi` quantiles of the write times (the platform's
    own timestamps): the run's throughput once started, before its tail."""
    n = len(times)
    if n < 20:
        return None
    ts = sorted(times)
    a, b = int(n * lo), int(n * hi) - 1
    span = ts[b] - ts[a]
    return (b - a) / span if span > 0 else None


# -- Ray --------------------------------------------------------------------------------------------


def start_ray(num_cpus: int | None = None) -> float:
    """Start a local Ray in this process (no dashboard, loopback Serve later); seconds taken."""
    import ray

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    )
    return time.perf_counter() - t0


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def start_serve_loopback() -> int:
    """Serve with its HTTP proxy on 127.0.0.1 and a free port (never all interfaces)."""
    import socket

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


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


# -- misc -----------------------------------------------------------------------------------------


def env_for_children() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def dump_json(name: str, obj: Any) -> None:
    """One machine-readable line per bench, after its tables."""
    say(json.dumps({"bench": name, **obj}, default=str))


# -- profiling (py-spy) ---------------------------------------------------------------------------

PROFILE_GROUPS = (
    ("httpx (request/response models, URL parsing, cookies)", ("httpx/",)),
    ("aiohttp / yarl / multidict (incl. socket writes)", ("aiohttp/", "yarl/", "multidict/")),
    ("asyncio / uvloop / selectors", ("asyncio/", "uvloop/", "selectors.py")),
    ("json", ("json/", "orjson")),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("Ray / Ray Data / pyarrow / numpy", ("ray/", "pyarrow/", "numpy/")),
    ("totask_ray (own code)", ("totask_ray/",)),
    (
        "urllib / http.cookiejar / ipaddress / socket",
        ("urllib/", "http/", "ipaddress.py", "socket.py", "ssl.py"),
    ),
    ("threading / concurrent.futures / contextlib", ("threading.py", "concurrent/", "contextlib.py")),
)


def _frame_path(frame: str) -> str:
    """`func (pkg/module.py:123)` -> `pkg/module.py`."""
    if "(" not in frame:
        return ""
    return frame.rsplit("(", 1)[1].rsplit(":", 1)[0].rstrip(")")


def py_spy() -> str | None:
    import shutil

    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def profile_pids(pids: list[int], seconds: float, out_dir: Path, rate: int = 100) -> list[Path]:
    """py-spy `record --format raw` (collapsed stacks, non-idle samples only) of each pid at once."""
    exe = py_spy()
    if exe is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for pid in pids:
        f = out_dir / f"pyspy-{pid}.txt"
        procs.append(subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw",
                                       "-o", str(f), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        files.append(f)
    for p in procs:
        p.wait()
    return [f for f in files if f.exists()]


def profile_summary(files: list[Path], seconds: float, rate: int = 100, top: int = 22) -> str:
    """Where the sampled processes spent their CPU: busy share, time by library (leaf frame's
    module), and the heaviest functions inclusive of what they call."""
    import collections
    import re

    by_group: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            if not line.strip() or " " not in line:
                continue
            stack, n_s = line.rsplit(" ", 1)
            try:
                n = int(n_s)
            except ValueError:
                continue
            total += n
            frames = stack.split(";")
            leaf = _frame_path(frames[-1])
            for name, needles in PROFILE_GROUPS:
                if leaf.startswith(needles):
                    by_group[name] += n
                    break
            else:
                by_group["other"] += n
            seen = set()
            for fr in frames:
                key = re.sub(r":\d+\)$", ")", fr)
                if key not in seen:
                    seen.add(key)
                    incl[key] += n
    if total == 0:
        return "(no samples)"
    lines = [
        f"{len(files)} process(es), {total} non-idle thread samples at {rate} Hz over {seconds:g} s "
        "(py-spy counts each thread that is not waiting)"
    ]
    lines.append(
        table(
            ["CPU by library (leaf frame)", "share"],
            [[k, f"{100 * v / total:.1f}%"] for k, v in by_group.most_common()],
        )
    )
    skip = ("Thread.", "_bootstrap", "<module>", "run_loop", "main_loop")
    rows = [
        [k[:110], f"{100 * v / total:.1f}%"]
        for k, v in incl.most_common(top * 3)
        if not any(s in k for s in skip)
    ][:top]
    lines.append(table(["heaviest functions (inclusive)", "share"], rows))
    return "\n".join(lines)
