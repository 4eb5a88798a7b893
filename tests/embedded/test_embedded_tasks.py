"""Tasks over real HTTP: filters alone and combined, pagination, fields/expand, annotate + history."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from helpers import follow_pages

STATUSES = ["pending", "in_progress", "completed", "in_review"]


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def crafted(platform) -> dict[str, Any]:
    """41 tasks with known status, assignee, creation time and collection (one without a unit)."""
    s = platform.store
    specs = [
        {"name": "image_1", "is_primary": True, "file_type": "image"},
        {"name": "annotation_data", "file_type": "json"},
    ]
    dc_a = s.create_data_collection("crafted A", specs)
    dc_b = s.create_data_collection("crafted B", specs)
    project = s.create_project("crafted", dc_a)
    u1, u2 = s.create_user("crafted_u1"), s.create_user("crafted_u2")
    units_a = s.create_data_units_bulk(
        dc_a, [{"files": {"image_1": {"url": f"http://example.invalid/a{i}.jpg"}}} for i in range(40)]
    )
    units_b = s.create_data_units_bulk(
        dc_b, [{"files": {"image_1": {"url": f"http://example.invalid/b{i}.jpg"}}} for i in range(40)]
    )
    rows = []
    for i in range(40):
        in_b = i % 5 == 0
        rows.append(
            {
                "status": STATUSES[i % 4],
                "assignee": [None, u1, u2][i % 3],
                "created_at": f"2025-01-{1 + i % 10:02d}T{(i * 7) % 24:02d}:30:00Z",
                "data_unit": units_b[i] if in_b else units_a[i],
                "dc": dc_b if in_b else dc_a,
            }
        )
    rows.append(
        {
            "status": "pending",
            "assignee": None,
            "created_at": "2025-01-05T00:00:00Z",
            "data_unit": None,
            "dc": None,
        }
    )
    ids = s.create_tasks_bulk(project, rows)
    return {"project": project, "dc_a": dc_a, "dc_b": dc_b, "u1": u1, "u2": u2, "ids": ids, "rows": rows}


def _expect(c: dict, pred) -> list[int]:
    return [i for i, r in zip(c["ids"], c["rows"], strict=True) if pred(r)]


FILTER_CASES = [
    ("status", lambda c: {"status": "pending"}, lambda c, r: r["status"] == "pending"),
    (
        "status__in csv",
        lambda c: {"status__in": "pending,completed"},
        lambda c, r: r["status"] in ("pending", "completed"),
    ),
    (
        "status__in repeated",
        lambda c: [("status__in", "in_review"), ("status__in", "in_progress")],
        lambda c, r: r["status"] in ("in_review", "in_progress"),
    ),
    ("data_collection", lambda c: {"data_collection": c["dc_b"]}, lambda c, r: r["dc"] == c["dc_b"]),
    ("assignee id", lambda c: {"assignee": c["u1"]}, lambda c, r: r["assignee"] == c["u1"]),
    ("assignee empty", lambda c: {"assignee": ""}, lambda c, r: r["assignee"] is None),
    ("assignee null", lambda c: {"assignee": "null"}, lambda c, r: r["assignee"] is None),
    ("assignee None", lambda c: {"assignee": "None"}, lambda c, r: r["assignee"] is None),
    (
        "created_at__gte date",
        lambda c: {"created_at__gte": "2025-01-05"},
        lambda c, r: _ts(r["created_at"]) >= datetime(2025, 1, 5, tzinfo=UTC),
    ),
    (
        "created_at__lte date is the whole day",
        lambda c: {"created_at__lte": "2025-01-03"},
        lambda c, r: _ts(r["created_at"]) < datetime(2025, 1, 4, tzinfo=UTC),
    ),
    (
        "created_at__gte datetime",
        lambda c: {"created_at__gte": "2025-01-02T12:00:00Z"},
        lambda c, r: _ts(r["created_at"]) >= datetime(2025, 1, 2, 12, tzinfo=UTC),
    ),
    (
        "created_at__lte datetime with offset",
        lambda c: {"created_at__lte": "2025-01-06T15:00:00+09:00"},
        lambda c, r: _ts(r["created_at"]) <= datetime(2025, 1, 6, 6, tzinfo=UTC),
    ),
    ("id__in", lambda c: {"id__in": f"{c['ids'][3]},{c['ids'][10]},{c['ids'][40]}"}, lambda c, r: False),
    (
        "combined",
        lambda c: {
            "status": "pending",
            "assignee": "",
            "data_collection": c["dc_a"],
            "created_at__gte": "2025-01-02",
        },
        lambda c, r: (
            r["status"] == "pending"
            and r["assignee"] is None
            and r["dc"] == c["dc_a"]
            and _ts(r["created_at"]) >= datetime(2025, 1, 2, tzinfo=UTC)
        ),
    ),
    (
        "combined status__in + date range + assignee",
        lambda c: {
            "status__in": "in_progress,completed",
            "created_at__gte": "2025-01-03",
            "created_at__lte": "2025-01-08",
            "assignee": c["u2"],
        },
        lambda c, r: (
            r["status"] in ("in_progress", "completed")
            and datetime(2025, 1, 3, tzinfo=UTC) <= _ts(r["created_at"]) < datetime(2025, 1, 9, tzinfo=UTC)
            and r["assignee"] == c["u2"]
        ),
    ),
]


@pytest.mark.parametrize("name,params,pred", FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
def test_filter(client, crafted, name, params, pred):
    p = params(crafted)
    base = [("project", crafted["project"]), ("fields", "id"), ("page_size", 7)]
    items = base + (list(p.items()) if isinstance(p, dict) else p)
    got, pages = follow_pages(client, items)
    if name == "id__in":
        want = sorted([crafted["ids"][3], crafted["ids"][10], crafted["ids"][40]])
    else:
        want = _expect(crafted, lambda r: pred(crafted, r))
    assert want, "the case must select something"
    assert len(want) < len(crafted["ids"]), "the case must leave something out"
    assert got == want
    assert all(pg["count"] == len(want) for pg in pages)


def test_limit_caps_count_and_pages(client, crafted):
    got, pages = follow_pages(
        client, {"project": crafted["project"], "fields": "id", "limit": 8, "page_size": 3}
    )
    assert got == crafted["ids"][:8]
    assert [len(p["results"]) for p in pages] == [3, 3, 2]
    assert all(p["count"] == 8 for p in pages)
    got, _ = follow_pages(
        client, {"project": crafted["project"], "fields": "id", "limit": 5, "status": "pending"}
    )
    assert got == _expect(crafted, lambda r: r["status"] == "pending")[:5]
    r = client.get("/sdk/tasks/", params={"project": crafted["project"], "limit": 0})
    assert r.json() == {"count": 0, "next": None, "previous": None, "results": []}


def test_pagination_follows_absolute_next(client, platform, demo):
    ids, pages = follow_pages(client, {"project": demo["project"], "fields": "id", "page_size": 30})
    first, last = demo["task_ids"]["first"], demo["task_ids"]["last"]
    assert ids == list(range(first, last + 1))
    assert len(pages) == 9 and len(set(ids)) == 250
    assert all(p["count"] == 250 for p in pages)
    for k, p in enumerate(pages[:-1], start=2):
        assert p["next"].startswith(f"{platform.url}/sdk/tasks/?")
        assert f"page={k}" in p["next"] and "page_size=30" in p["next"] and "fields=id" in p["next"]
        assert f"project={demo['project']}" in p["next"]
    assert pages[0]["previous"] is None
    assert "page=" not in pages[1]["previous"]  # DRF drops page=1
    assert "page=2" in pages[2]["previous"]
    # repeated params survive into next
    r = client.get(
        "/sdk/tasks/",
        params=[
            ("project", demo["project"]),
            ("status__in", "pending"),
            ("status__in", "completed"),
            ("page_size", 5),
        ],
    )
    assert r.json()["next"].count("status__in=") == 2


def test_pagination_defaults_caps_and_bad_pages(client, demo):
    r = client.get("/sdk/tasks/", params={"project": demo["project"], "fields": "id"}).json()
    assert len(r["results"]) == 100 and r["count"] == 250
    r = client.get(
        "/sdk/tasks/", params={"project": demo["project"], "fields": "id", "page_size": 5000}
    ).json()
    assert len(r["results"]) == 250 and r["next"] is None  # capped at 1000, all fit
    for page in ("99", "0", "x"):
        r = client.get("/sdk/tasks/", params={"project": demo["project"], "page_size": 100, "page": page})
        assert r.status_code == 404 and r.json() == {"detail": "Invalid page."}


@pytest.mark.parametrize(
    "params,field",
    [
        ({"bogus": "1"}, "bogus"),
        ({"ordering": "created_at"}, "ordering"),  # id and -id only (keyset reads)
        ({"id__gt": "x"}, "id__gt"),
        ({"id__lte": "1.5"}, "id__lte"),
        ({"project": "abc"}, "project"),
        ({"project": ""}, "project"),
        ({}, "project"),
        ({"project": "999999"}, "project"),
        ({"assignee": "x"}, "assignee"),
        ({"data_collection": "1.5"}, "data_collection"),
        ({"data_collection": "999999"}, "data_collection"),
        ({"created_at__gte": "yesterday"}, "created_at__gte"),
        ({"created_at__lte": "2025-13-01"}, "created_at__lte"),
        ({"id__in": "1,two"}, "id__in"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1_000"}, "limit"),
        ({"id__in": "99999999999999999999999"}, "id__in"),
        ({"page_size": "0"}, "page_size"),
    ],
)
def test_bad_task_filters_are_400_naming_the_field(client, crafted, params, field):
    p = dict(params)
    if field != "project":
        p.setdefault("project", crafted["project"])
    r = client.get("/sdk/tasks/", params=p)
    assert r.status_code == 400, r.text
    body = r.json()
    assert list(body) == [field] and isinstance(body[field], list) and body[field][0]


def test_task_list_full_objects_fields_and_expand(client, crafted):
    r = client.get("/sdk/tasks/", params={"project": crafted["project"], "page_size": 2}).json()
    t = r["results"][0]
    assert set(t) == {"id", "project", "data_unit", "status", "assignee", "created_at", "updated_at", "data"}
    assert t["project"] == crafted["project"] and isinstance(t["data_unit"], int) and t["data"] == {}
    assert t["created_at"] == crafted["rows"][0]["created_at"].replace(":00Z", ":00.000000Z")
    r = client.get(
        "/sdk/tasks/",
        params={
            "project": crafted["project"],
            "page_size": 2,
            "fields": "id,status,data_unit",
            "expand": "data_unit",
        },
    ).json()
    t = r["results"][0]
    assert set(t) == {"id", "status", "data_unit"}
    assert t["data_unit"]["files"]["image_1"]["url"] == "http://example.invalid/b0.jpg"  # task 0 is in B


def test_get_task_expanded(client, platform, demo):
    tid = demo["task_ids"]["first"] + 3
    r = client.get(f"/tasks/{tid}/", params={"fields": "id,data,data_unit", "expand": "data_unit"})
    assert r.status_code == 200
    t = r.json()
    assert set(t) == {"id", "data", "data_unit"} and t["id"] == tid
    files = t["data_unit"]["files"]
    assert set(files) == {"image_1", "annotation_data"}
    img, ann = files["image_1"], files["annotation_data"]
    assert img["is_primary"] is True and ann["is_primary"] is False
    assert img["file_type"] == "image" and ann["file_type"] == "json"
    assert ann["file_name_original"] == "annotation_000003.json"
    assert img["url"].startswith(f"{platform.url}/media/demo/images/") and "signature=" in img["url"]
    assert set(img) == {"url", "is_primary", "file_name_original", "file_type"}
    # without expand the unit is an id; fields project
    t = client.get(f"/tasks/{tid}/").json()
    assert isinstance(t["data_unit"], int) and set(t) >= {"id", "status", "assignee", "created_at", "data"}
    assert client.get(f"/tasks/{tid}/", params={"fields": "id"}).json() == {"id": tid}


def test_each_task_has_its_own_annotation_file(client, demo):
    seen = set()
    for tid in range(demo["task_ids"]["first"], demo["task_ids"]["first"] + 5):
        t = client.get(f"/tasks/{tid}/", params={"fields": "id,data,data_unit", "expand": "data_unit"}).json()
        body = client.get(t["data_unit"]["files"]["annotation_data"]["url"]).json()
        assert body["objects"] and all(o["type"] in ("bbox", "polygon") for o in body["objects"])
        seen.add(repr(body))
    assert len(seen) == 5


def test_task_without_data_unit_and_missing_objects(client, crafted):
    tid = crafted["ids"][-1]
    t = client.get(f"/tasks/{tid}/", params={"fields": "id,data,data_unit", "expand": "data_unit"}).json()
    assert t == {"id": tid, "data": {}, "data_unit": None}
    for path in (
        "/tasks/99999999/",
        "/projects/99999999/",
        "/data_collections/99999999/",
        "/data_units/99999999/",
    ):
        r = client.get(path)
        assert r.status_code == 404 and r.json() == {"detail": "Not found."}
    r = client.get("/no/such/endpoint/")
    assert r.status_code == 404 and r.json() == {"detail": "Not found."}


def test_project_collection_and_data_unit(client, demo):
    p = client.get(f"/projects/{demo['project']}/").json()
    assert p == {
        "id": demo["project"],
        "title": p["title"],
        "data_collection": demo["data_collection"],
        "classes": [],
    }
    dc = client.get(
        f"/data_collections/{demo['data_collection']}/", params={"expand": "file_specifications"}
    ).json()
    assert [s["name"] for s in dc["file_specifications"]] == ["image_1", "annotation_data"]
    assert set(dc["file_specifications"][0]) == {"id", "name", "is_primary", "is_required", "file_type"}
    plain = client.get(f"/data_collections/{demo['data_collection']}/").json()
    assert plain["file_specifications"] == [s["id"] for s in dc["file_specifications"]]
    du_id = demo["data_units"]["first"]
    du = client.get(f"/data_units/{du_id}/", params={"expand": "files"}).json()
    assert du["id"] == du_id and du["data_collection"] == demo["data_collection"]
    assert set(du["files"]) == {"image_1", "annotation_data"}
    assert all(isinstance(f, int) for f in client.get(f"/data_units/{du_id}/").json()["files"])


def test_project_without_collection(client, platform):
    pid = platform.store.create_project("no collection")
    assert client.get(f"/projects/{pid}/").json()["data_collection"] is None


def test_annotate_stores_returns_and_records_history(client, platform, crafted):
    tid = crafted["ids"][1]
    data = {
        "objects": [
            {
                "id": "obj_001",
                "class_id": 1,
                "type": "bbox",
                "coordinates": {"x": 1, "y": 2, "width": 3, "height": 4},
            }
        ]
    }
    r = client.put(
        f"/tasks/{tid}/annotate_task_data/", params={"schema": "any"}, json={"action": "submit", "data": data}
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"] == tid and r.json()["data"] == data
    assert client.get(f"/tasks/{tid}/", params={"fields": "data"}).json() == {"data": data}
    # a double write is visible in the history
    r = client.put(f"/tasks/{tid}/annotate_task_data/", json={"action": "save", "data": {"v": 2}})
    assert r.status_code == 200
    h = client.get(f"/_local/tasks/{tid}/history/").json()
    assert h["count"] == 2
    assert [(e["action"], e["schema"], e["data"]) for e in h["results"]] == [
        ("submit", "any", data),
        ("save", None, {"v": 2}),
    ]
    assert h["results"][0]["created_at"] < h["results"][1]["created_at"]
    assert len(h["results"][0]["created_at"].split(".")[1]) == 7  # microseconds + Z
    assert platform.store.history_counts([tid]) == {tid: 2}
    assert [e["data"] for e in platform.store.history(tid)] == [data, {"v": 2}]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"data": {}}, "action"),
        ({"action": "approve", "data": {}}, "action"),
        ({"action": "submit"}, "data"),
        ({"action": "submit", "data": [1, 2]}, "data"),
        ({"action": "submit", "data": "text"}, "data"),
        ({"action": "submit", "data": {}, "extra": 1}, "extra"),
        ([{"action": "submit", "data": {}}], "non_field_errors"),
    ],
)
def test_annotate_validation_applies_nothing(client, platform, crafted, body, field):
    tid = crafted["ids"][2]
    before = platform.store.history_counts([tid]).get(tid, 0)
    r = client.put(f"/tasks/{tid}/annotate_task_data/", json=body)
    assert r.status_code == 400 and field in r.json()
    assert platform.store.history_counts([tid]).get(tid, 0) == before
    assert platform.store.get_task(tid)["data"] == {}


def test_annotate_bad_json_unknown_task_and_wrong_method(client, crafted):
    tid = crafted["ids"][2]
    r = client.put(
        f"/tasks/{tid}/annotate_task_data/",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "detail" in r.json()
    r = client.put("/tasks/99999999/annotate_task_data/", json={"action": "submit", "data": {}})
    assert r.status_code == 404 and r.json() == {"detail": "Not found."}
    for method, path in (
        ("POST", f"/tasks/{tid}/annotate_task_data/"),
        ("DELETE", f"/tasks/{tid}/"),
        ("POST", "/sdk/tasks/"),
    ):
        r = client.request(method, path, json={})
        assert r.status_code == 405 and r.json()["detail"] == f'Method "{method}" not allowed.'


def test_patch_task_status_and_assignee(client, platform):
    pid = platform.store.create_project("patch me")
    (tid,) = platform.store.create_tasks_bulk(pid, [{"status": "pending"}])
    r = client.patch(f"/tasks/{tid}/", json={"status": "in_review", "assignee": 5})
    assert r.status_code == 200 and r.json()["status"] == "in_review" and r.json()["assignee"] == 5
    assert client.get("/sdk/tasks/", params={"project": pid, "status": "in_review"}).json()["count"] == 1
    assert client.get("/sdk/tasks/", params={"project": pid, "status": "pending"}).json()["count"] == 0
    assert client.patch(f"/tasks/{tid}/", json={"data": {}}).status_code == 400
    assert client.patch("/tasks/99999999/", json={"status": "x"}).status_code == 404


def test_listing_sees_changes_made_by_another_process(client, platform):
    """The server's cached id lists must not go stale when tests write through their own Store."""
    pid = platform.store.create_project("changing")
    ids = platform.store.create_tasks_bulk(pid, [{"status": "pending"}] * 5)
    assert client.get("/sdk/tasks/", params={"project": pid, "status": "pending"}).json()["count"] == 5
    platform.store.update_task(ids[0], status="completed")
    platform.store.create_tasks_bulk(pid, [{"status": "pending"}] * 2)
    assert client.get("/sdk/tasks/", params={"project": pid, "status": "pending"}).json()["count"] == 6


def test_listing_stays_fast_with_many_tasks(client, platform):
    pid = platform.store.create_project("big")
    statuses = ["pending", "in_progress", "completed"]
    t0 = time.perf_counter()
    ids = platform.store.create_tasks_bulk(
        pid,
        (
            {"status": statuses[i % 3], "created_at": f"2025-02-{1 + i % 28:02d}T10:00:00Z"}
            for i in range(200_000)
        ),
    )
    assert time.perf_counter() - t0 < 20  # executemany: 200,000 tasks in seconds
    assert ids == list(range(ids[0], ids[0] + 200_000))
    params = {
        "project": pid,
        "status__in": "pending,completed",
        "created_at__gte": "2025-02-10",
        "fields": "id",
        "page_size": 100,
    }
    t0 = time.perf_counter()
    first = client.get("/sdk/tasks/", params=params).json()
    t_first = time.perf_counter() - t0
    assert first["count"] > 80_000
    last_page = first["count"] // 100
    t0 = time.perf_counter()
    for page in range(last_page - 19, last_page + 1):
        r = client.get("/sdk/tasks/", params={**params, "page": page})
        assert r.status_code == 200
    t_pages = time.perf_counter() - t0
    assert t_first < 3.0, t_first
    assert t_pages < 2.0, t_pages  # 20 deep pages, not 20 full scans
