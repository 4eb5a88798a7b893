"""Which tasks a preview looks at: a sample of the ones the job's filters select.

The listing is never read whole: `first` reads one page of N ids; a seeded random sample draws N
positions in the counted listing and reads only the pages that hold them (at most N pages, each a
few ms), so sampling 20 of 200,000 tasks costs what sampling 20 of 200 does. The same seed over
the same listing gives the same sample.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from totask_ray.platform.base import Platform

# The sample travels as an `id__in` filter, which both platforms take; on Synapse it is a query
# string, so it stays a few kB long (500 ids of 8 digits: 4.5 kB).
MAX_SAMPLE = 500


class SampleError(ValueError):
    """The sample cannot be drawn; the message says what to change."""


def draw_sample(
    client: Platform,
    project: int,
    filters: Mapping[str, Any],
    size: int,
    *,
    seed: int | None = 0,
    first: bool = False,
    page_size: int = 500,
) -> tuple[list[int], int]:
    """`size` task ids the filters select (sorted), and how many the filters select in all.

    `first`: the listing's first `size` ids; else `size` positions drawn with `seed`."""
    if not 1 <= size <= MAX_SAMPLE:
        raise SampleError(f"--sample must be between 1 and {MAX_SAMPLE}, got {size}")
    total = client.count_tasks(project, filters)
    if total == 0:
        raise SampleError("No tasks found matching filters: check task_filters and that the tasks exist")
    if first or size >= total:
        ids = list(_take(client.iter_task_ids(project, filters, page_size=min(size, page_size)), size))
        return sorted(ids), total
    positions = sorted(random.Random(seed).sample(range(total), size))
    by_page: dict[int, list[int]] = {}
    for pos in positions:
        by_page.setdefault(pos // page_size + 1, []).append(pos % page_size)
    ids: list[int] = []
    for page, offsets in by_page.items():
        listed = client.task_id_page(project, filters, page=page, page_size=page_size).ids
        ids.extend(listed[o] for o in offsets if o < len(listed))  # the listing may have shrunk since
    return sorted(set(ids)), total


def _take(it: Any, n: int) -> list[int]:
    out: list[int] = []
    for tid in it:
        out.append(int(tid))
        if len(out) >= n:
            break
    return out
