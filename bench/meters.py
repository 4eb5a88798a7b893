"""The machine, its load, CPU shares: what every figure is printed with (machine info, the load
average during the runs, the CPU seconds per wall second of each process group)."""

from __future__ import annotations

import contextlib
import os
import platform as _platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.environment import ROOT

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
