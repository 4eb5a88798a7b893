"""The embedded platform a bench runs against: start it, seed the files demo, and read back from
its annotation history when and how fast each task was written."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bench.environment  # noqa: F401 - scrubs the environment before totask_ray and ray are imported

FILE_TARGET_SPEC = "annotation_data"


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
