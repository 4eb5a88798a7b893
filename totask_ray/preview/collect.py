"""Each sampled task as the page shows it: the dry run's outcome, the task's data now, its image.

The outcome (status, stage, reason, the payload it would write) is the dry run's own record; only
what a picture needs besides is read here, with the same async client and downloader (URL policy,
byte caps, the platform's media credentials) the annotators use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from totask_ray.net.downloads import Downloader, DownloadError
from totask_ray.net.redact import safe_error
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.connect import connect_async
from totask_ray.platform.errors import PlatformError

T = TypeVar("T")
CONCURRENCY = 8


@dataclass
class TaskView:
    task_id: int
    status: str
    stage: str
    error: str
    would_write: Any = None  # the payload the dry run would write (None: nothing to write)
    current: Any = None  # the task's data on the platform now
    image: bytes | None = None  # the primary file's bytes
    image_name: str = ""
    image_error: str = ""  # why there is no picture
    read_s: float | None = None  # reading the task (and its data unit), measured here
    download_s: float | None = None  # downloading its primary file, measured here

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def views_from_report(records: Iterable[dict[str, Any]]) -> list[TaskView]:
    out = []
    for rec in records:
        would = rec.get("would_write")
        if isinstance(would, str):
            would = json.loads(would)
        out.append(
            TaskView(
                task_id=int(rec["task_id"]),
                status=str(rec.get("status", "")),
                stage=str(rec.get("stage", "")),
                error=str(rec.get("error") or ""),
                would_write=would,
            )
        )
    return sorted(out, key=lambda v: v.task_id)


def fill_views(spec: RunSpec, views: list[TaskView]) -> None:
    """Read each view's task (its data now) and primary image, `CONCURRENCY` at a time."""
    run_async(_fill(spec, views))


async def _fill(spec: RunSpec, views: list[TaskView]) -> None:
    client = connect_async(spec.platform)
    o = spec.options
    downloader = Downloader(spec.url_policy, timeout_s=o.download_timeout_s, headers=client.media_headers)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(view: TaskView) -> None:
        async with sem:
            try:
                t0 = time.perf_counter()
                task = await client.get_task(view.task_id)
                view.current = task.data
                unit = task.expanded_data_unit
                if (unit is None or not unit.files) and task.data_unit_id is not None:
                    unit = await client.get_data_unit(task.data_unit_id)
                view.read_s = time.perf_counter() - t0
                primary = unit.primary_file() if unit is not None else None
                if primary is None or not primary.url:
                    view.image_error = "the data unit has no primary file with a URL"
                    return
                view.image_name = primary.name or ""
                t1 = time.perf_counter()
                view.image = await downloader.fetch_image(primary.url, max_bytes=o.max_image_bytes)
                view.download_s = time.perf_counter() - t1
            except Exception as exc:  # one task's picture; the page says why it is missing
                view.image_error = safe_error(exc, bare=(DownloadError, PlatformError))

    try:
        await asyncio.gather(*(one(v) for v in views))
    finally:
        for closer in (getattr(downloader, "aclose", None), getattr(client, "aclose", None)):
            if closer is not None:
                await closer()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, also from inside a running loop (a Jupyter cell): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
