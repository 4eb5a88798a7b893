"""Task ids, streamed from the platform into a Ray Dataset.

The driver reads only the first page (to learn `count`); the rest is read by Ray Data read tasks,
each walking a short stretch of the listing (1,000 ids at the run's default page size of 500), so
neither the driver nor any worker holds the whole listing.
Read tasks ask for a fraction of a CPU: a read that needs a whole CPU can starve behind Data actors
and Serve replicas (the measured deadlock in shared/reference/ray-2.60-notes.md).

Two ways to cut the listing, picked once on the driver:
- **id ranges** (keyset), where the platform orders by id and filters `id__gt` / `id__lte`
  (`platform.base.IdRanges`): the driver asks for the lowest and highest matching ids and cuts that
  span into as many equal ranges as there would be reads; each read lists its range in id order,
  every page resuming after the last id it got. A page costs the server the same at any depth, and
  a task that leaves the filters while the run writes (`on_success`) shifts nothing: it is always
  behind the read that listed it. Ids created after the count, above the highest, are not listed.
- **offset pages** elsewhere (a DRF page number), two pages a read, as before.

A resume's done ids (`Exclusion`) travel by reference: one object in the object store that each
read fetches (zero-copy on its node), not a copy in every read task: Ray Data puts every read task
in the object store up front, so a copy each was 1,000 reads x 4 MB at 1M tasks with 500k done.

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
from collections.abc import Callable, Iterable, Iterator
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


class Exclusion:
    """Task ids to skip (a resume's done ids, sorted), held by reference.

    `share` puts the array in the object store once; what pickles into each read task is the
    reference (about 100 bytes, whatever the count), and `ids()` fetches it where the read runs.
    `local` keeps the array by value, for reads run in this process without Ray (tests).
    """

    def __init__(self, count: int, ref: Any = None, ids: np.ndarray | None = None):
        self.count = count
        self._ref = ref
        self._ids = ids

    @classmethod
    def share(cls, ids: np.ndarray) -> Exclusion:
        import ray

        arr = np.ascontiguousarray(ids, dtype=np.int64)
        return cls(len(arr), ref=ray.put(arr))

    @classmethod
    def local(cls, ids: np.ndarray) -> Exclusion:
        arr = np.ascontiguousarray(ids, dtype=np.int64)
        return cls(len(arr), ids=arr)

    def ids(self) -> np.ndarray:
        if self._ids is not None:
            return self._ids
        import ray

        return ray.get(self._ref)


def as_exclusion(exclude: np.ndarray | Exclusion | None) -> Exclusion | None:
    """An exclusion by reference where Ray runs (a pipeline), by value where it does not."""
    if exclude is None or isinstance(exclude, Exclusion):
        return exclude
    import ray

    return Exclusion.share(exclude) if ray.is_initialized() else Exclusion.local(exclude)


def id_block(ids: list[int] | np.ndarray, exclude: np.ndarray | None) -> pa.Table:
    arr = np.asarray(ids, dtype=np.int64)
    if exclude is not None and len(exclude) and len(arr):
        pos = np.searchsorted(exclude, arr)
        pos[pos >= len(exclude)] = 0
        arr = arr[exclude[pos] != arr]
    return pa.table({"task_id": arr})


def id_ranges(lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    """`(after, upto]` ranges that cover `lo..hi` once, at most `n` of them, of equal width."""
    n = max(1, min(n, hi - lo + 1))
    width = math.ceil((hi - lo + 1) / n)
    return [(a, min(hi, a + width)) for a in range(lo - 1, hi, width)]


class TaskIdSource(Datasource):
    """A Ray Data `Datasource` over the platform's task listing.

    It reads the run's spec (the platform, the project and filters, the run's `page_size`);
    `bounds` (the lowest and highest matching ids, `platform.base.id_bounds`) reads id ranges, None
    offset pages; `exclude` drops tasks already done in a previous run (`--resume`).
    """

    def __init__(
        self,
        spec: RunSpec,
        count: int,
        exclude: np.ndarray | Exclusion | None = None,
        stop_flag: Any = None,
        bounds: tuple[int, int] | None = None,
    ):
        self.config = spec.platform
        self.project = spec.params.project
        self.filters = dict(spec.params.task_filters)
        self.page_size = spec.options.page_size
        self.count = count
        self.exclude = as_exclusion(exclude)
        self.stop_flag = stop_flag
        self.bounds = bounds

    def get_name(self) -> str:
        return "PlatformTasks"

    def estimate_inmemory_data_size(self) -> int:
        return self.count * 8

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.count / self.page_size))

    @property
    def read_count(self) -> int:
        """How many read tasks `get_read_tasks` makes (at most, for id ranges)."""
        if self.bounds is not None:
            return len(self.ranges())
        return math.ceil(self.pages / PAGES_PER_READ_TASK)

    def ranges(self) -> list[tuple[int, int]]:
        assert self.bounds is not None
        return id_ranges(*self.bounds, math.ceil(self.pages / PAGES_PER_READ_TASK))

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        # `parallelism` is ignored: reads are sized for a quick first block
        tasks = []
        if self.bounds is not None:
            rows = math.ceil(self.count / len(self.ranges()))  # an estimate: ids need not be dense
            for after, upto in self.ranges():
                meta = BlockMetadata(num_rows=rows, size_bytes=rows * 8, exec_stats=None, input_files=None)
                read = self._range_reader(after, upto)
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
            return tasks
        pages, per = self.pages, PAGES_PER_READ_TASK
        for start in range(1, pages + 1, per):
            stop = min(pages, start + per - 1)
            rows = min(self.count, stop * self.page_size) - (start - 1) * self.page_size
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * 8, exec_stats=None, input_files=None)
            tasks.append(
                ReadTask(self._page_reader(start, stop), meta, per_task_row_limit=per_task_row_limit)
            )
        return tasks

    def _page_reader(self, first_page: int, last_page: int) -> Callable[[], Iterable[pa.Table]]:
        project, filters, size = self.project, self.filters, self.page_size

        def pages(client: Any) -> Iterator[Any]:
            for page in range(first_page, last_page + 1):
                try:
                    result = client.task_id_page(project, filters, page=page, page_size=size)
                except NotFoundError:
                    return  # the listing shrank since it was counted: this page is gone
                yield result
                if not result.next:
                    return

        return self._reader(pages)

    def _range_reader(self, after: int, upto: int) -> Callable[[], Iterable[pa.Table]]:
        project, filters, size = self.project, self.filters, self.page_size

        def pages(client: Any) -> Iterator[Any]:
            last = after
            while True:
                result = client.task_id_range_page(project, filters, after=last, upto=upto, page_size=size)
                yield result
                if not result.next or not result.ids:
                    return
                last = result.ids[-1]

        return self._reader(pages)

    def _reader(self, pages: Callable[[Any], Iterator[Any]]) -> Callable[[], Iterable[pa.Table]]:
        """A read task over one walk of pages: the stop flag checked before each page, a resume's
        done ids left out. It captures these few values, not the source (it travels pickled)."""
        config, exclude, flag = self.config, self.exclude, self.stop_flag

        def read() -> Iterable[pa.Table]:
            skip = exclude.ids() if exclude is not None else None
            with contextlib.closing(connect(config)) as client:
                walk = pages(client)
                while not is_set(flag):  # stopped: no one will annotate what is listed now
                    result = next(walk, None)
                    if result is None:
                        return
                    if result.ids:
                        yield id_block(result.ids, skip)

        return read


def task_dataset(source: TaskIdSource) -> Any:
    import ray.data

    return ray.data.read_datasource(
        source, num_cpus=READ_TASK_CPUS, concurrency=min(READ_CONCURRENCY, source.read_count)
    )


def list_ids(source: TaskIdSource, threads: int = 4) -> np.ndarray:
    """Every id the source lists, read here (its reads run on `threads` threads), in id order.

    For a snapshot before anything is written: offset pages read later would skip tasks the run
    moved out of the filters, so every page is read first (several at a time: they are independent).
    """
    from concurrent.futures import ThreadPoolExecutor

    def run(task: ReadTask) -> list[np.ndarray]:
        return [t.column("task_id").to_numpy() for t in task()]

    tasks = source.get_read_tasks(parallelism=1)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(tasks)))) as pool:
        parts = [a for chunk in pool.map(run, tasks) for a in chunk]
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(parts))  # pages overlap by nothing, unless the listing moved
