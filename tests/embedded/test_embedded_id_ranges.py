"""The task listing read by id ranges (keyset): `ordering=id|-id` and `id__gt/gte/lt/lte` on
`sdk/tasks/`, over real HTTP, with the id cache current and stale (a write by another connection).

A run relies on: ids in id order (or highest first with `-id`), the bounds ANDed with the job's own
filters, `count` of the bounded set, and `next` set while more follow in the range."""

from __future__ import annotations

from typing import Any

import httpx
from helpers import config_for, make_project

from totask_ray.platform.synapse.client import SynapseClient


def _ids(client: httpx.Client, **params: Any) -> tuple[int, list[int], str | None]:
    r = client.get("/sdk/tasks/", params={"fields": "id", **params})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["count"], [t["id"] for t in body["results"]], body["next"]


def _project(platform) -> tuple[int, list[int]]:
    statuses = ["pending", "completed", "pending", "in_review"] * 25
    return make_project(platform, [{"files": None, "status": s} for s in statuses])


def test_bounds_and_ordering_with_the_cache_current_and_stale(client, platform):
    project, ids = _project(platform)
    pending = [
        t
        for t, s in zip(ids, ["pending", "completed", "pending", "in_review"] * 25, strict=True)
        if s == "pending"
    ]
    for stale in (False, True):
        if stale:  # another connection's commit: the server's cached id list no longer counts
            platform.store.update_task(ids[-1], status="in_review")
        assert _ids(client, project=project, status="pending", page_size=3, ordering="id")[1] == pending[:3]
        count, got, nxt = _ids(client, project=project, status="pending", ordering="-id", page_size=2)
        assert (count, got) == (len(pending), pending[::-1][:2]) and nxt is not None
        after, upto = pending[4], pending[9]
        count, got, nxt = _ids(
            client, project=project, status="pending", ordering="id", id__gt=after, id__lte=upto, page_size=3
        )
        assert (count, got) == (5, pending[5:8]) and nxt is not None
        count, got, nxt = _ids(
            client,
            project=project,
            status="pending",
            ordering="id",
            id__gt=pending[7],
            id__lte=upto,
            page_size=3,
        )
        assert (count, got, nxt) == (2, pending[8:10], None)
        assert _ids(client, project=project, id__gte=ids[10], id__lt=ids[13])[1] == ids[10:13]


def test_limit_is_cut_before_the_bounds(client, platform):
    project, ids = _project(platform)
    # `limit` keeps the first 10 of the listing; a range inside it cannot reach past them
    count, got, _ = _ids(client, project=project, limit=10, id__gt=ids[5], page_size=100)
    assert (count, got) == (4, ids[6:10])


def test_the_client_finds_the_bounds_and_checks_the_server_honours_them(platform):
    project, ids = _project(platform)
    with SynapseClient(config_for(platform)) as c:
        assert c.id_bounds(project, {"status": "pending"}) == (ids[0], ids[-2])
        assert c.id_bounds(project, {"limit": 5}) is None  # a range would change what `limit` keeps
        page = c.task_id_range_page(
            project, {"status": "completed"}, after=ids[0], upto=ids[9], page_size=100
        )
        assert page.ids == [ids[1], ids[5], ids[9]] and page.next is None
    with SynapseClient(config_for(platform, id_ranges=False)) as c:
        assert c.id_bounds(project, {}) is None  # told not to: offset pages
