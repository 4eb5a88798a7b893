"""Task ids, streamed from the platform into a Ray Dataset.

The driver reads only the first page (to learn `count`); the rest is read by Ray Data read tasks,
each walking a short range of pages (1,000 ids at the run's default page size of 500), so neither
the driver nor any worker holds the whole listing.
Read tasks ask for a fraction of a CPU: a read that needs a whole CPU can starve behind Data actors
and Serve replicas (the measured deadlock in shared/reference/ray-2.60-notes.md).

Listing is far faster than annotating (a page of 100 ids costs a few ms; annotating them, a
second), so reads are many short tasks, at most `READ_CONCURRENCY` at a time: Ray reuses those
few worker processes instead of starting one per read (each start imports Ray Data: seconds on a
small machine, all before the first task is annotated), and Ray Data hands a read's ids on only
when that read ends (it coalesces a task's small blocks), so a short range reaches the actors soon;
small blocks also spread the last tasks of a run over every actor.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from totask_ray.pipeline.spec import RunSpec
from totask_ray.pipeline.stop import is_set
from totask_ray.platform.connect import connect
from totask_ray.platform.errors import NotFoundError

READ_TASK_CPUS = 0.1
PAGES_PER_READ_TASK = 2
READ_CONCURRENCY = 2


def id_block(ids: list[int], exclude: np.ndarray | None) -> pa.Table:
    arr = np.asarray(ids, dtype=np.int64)
    if exclude is not None and len(exclude):
        pos = np.searchsorted(exclude, arr)
        pos[pos >= len(exclude)] = 0
        arr = arr[exclude[pos] != arr]
    return pa.table({"task_id": arr})


class TaskIdSource(Datasource):
    """A Ray Data `Datasource` over the platform's task-id pages.

    It reads the run's spec (the platform, the project and filters, the run's `page_size`);
    `exclude` (sorted ids) drops tasks already done in a previous run (`--resume`).
    """

    def __init__(self, spec: RunSpec, count: int, exclude: np.ndarray | None = None, stop_flag: Any = None):
        self.config = spec.platform
        self.project = spec.params.project
        self.filters = dict(spec.params.task_filters)
        self.page_size = spec.options.page_size
        self.count = count
        self.exclude = exclude
        self.stop_flag = stop_flag

    def get_name(self) -> str:
        return "PlatformTasks"

    def estimate_inmemory_data_size(self) -> int:
        return self.count * 8

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.count / self.page_size))

    @property
    def read_count(self) -> int:
        """How many read tasks `get_read_tasks` makes."""
        return math.ceil(self.pages / PAGES_PER_READ_TASK)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        pages = self.pages
        per = PAGES_PER_READ_TASK  # `parallelism` is ignored: reads are sized for a quick first block
        tasks = []
        for start in range(1, pages + 1, per):
            stop = min(pages, start + per - 1)
            rows = min(self.count, stop * self.page_size) - (start - 1) * self.page_size
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * 8, exec_stats=None, input_files=None)
            tasks.append(ReadTask(self._reader(start, stop), meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def _reader(self, first_page: int, last_page: int):
        config, project, filters, size, exclude, flag = (
            self.config,
            self.project,
            self.filters,
            self.page_size,
            self.exclude,
            self.stop_flag,
        )

        def read() -> Iterable[pa.Table]:
            with contextlib.closing(connect(config)) as client:
                for page in range(first_page, last_page + 1):
                    if is_set(flag):
                        return  # stopped: no one will annotate what is listed now
                    try:
                        result = client.task_id_page(project, filters, page=page, page_size=size)
                    except NotFoundError:
                        return  # the listing shrank since it was counted: this page is gone
                    if result.ids:
                        yield id_block(result.ids, exclude)
                    if not result.next:
                        return

        return read


def task_dataset(source: TaskIdSource) -> Any:
    import ray.data

    return ray.data.read_datasource(
        source, num_cpus=READ_TASK_CPUS, concurrency=min(READ_CONCURRENCY, source.read_count)
    )
