"""The demo seeders and the Store used directly (as tests and seeders in other processes do)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from totask_ray.embedded.seeds import DEMOS, seed_files_demo
from totask_ray.embedded.store import Store, TaskQuery


def test_seed_over_the_admin_endpoint(client, platform):
    r = client.post("/_local/seed/", json={"demo": "files", "tasks": 40, "seed": 5})
    assert r.status_code == 201, r.text
    ids = r.json()
    assert set(ids) >= {
        "demo",
        "project",
        "data_collection",
        "specifications",
        "task_ids",
        "counts_by_status",
        "counts_by_assignee",
        "counts_by_day",
        "users",
        "images",
    }
    assert ids["specifications"] == ["image_1", "annotation_data"]
    assert sum(ids["counts_by_status"].values()) == 40
    for status, n in ids["counts_by_status"].items():
        got = client.get(
            "/sdk/tasks/", params={"project": ids["project"], "status": status, "fields": "id"}
        ).json()
        assert got["count"] == n
    unassigned = client.get("/sdk/tasks/", params={"project": ids["project"], "assignee": "", "fields": "id"})
    assert unassigned.json()["count"] == ids["counts_by_assignee"].get("null", 0)
    for rel in ids["images"]:
        assert (platform.media_dir / rel).is_file()


@pytest.mark.parametrize(
    "body,field",
    [
        ({"demo": "nope"}, "demo"),
        ({"demo": "files", "tasks": -1}, "tasks"),
        ({"demo": "files", "tasks": "many"}, "tasks"),
        ({"demo": "files", "tasks": 1, "seed": "x"}, "seed"),
        ({"demo": "files", "tasks": 1, "colour": "red"}, "colour"),
    ],
)
def test_seed_validation(client, body, field):
    r = client.post("/_local/seed/", json=body)
    assert r.status_code == 400 and field in r.json()


def test_demo_content_is_varied_and_in_the_task_object_format(platform, demo):
    files = sorted((platform.media_dir / f"demo/files/p{demo['project']}").rglob("*.json"))
    assert len(files) == 250
    kinds, labels = set(), set()
    for f in files:
        body = json.loads(f.read_text())
        assert list(body) == ["objects"] and body["objects"]
        for o in body["objects"]:
            assert set(o) == {"id", "class_id", "type", "coordinates", "properties"}
            assert o["id"].startswith("obj_") and isinstance(o["class_id"], int)
            assert (
                set(o["properties"]) == {"label", "confidence"} and 0.5 <= o["properties"]["confidence"] < 1
            )
            kinds.add(o["type"])
            labels.add(o["properties"]["label"])
            if o["type"] == "bbox":
                assert set(o["coordinates"]) == {"x", "y", "width", "height"}
            else:
                pts = o["coordinates"]["points"]
                assert len(pts) >= 3 and all(len(p) == 2 for p in pts)
    assert kinds == {"bbox", "polygon"} and len(labels) >= 4
    assert len(demo["counts_by_status"]) >= 3
    assert "null" in demo["counts_by_assignee"] and len(demo["counts_by_assignee"]) >= 3
    assert len(demo["counts_by_day"]) >= 5


def test_seed_is_deterministic_and_images_are_written_once(tmp_path):
    store = Store(tmp_path / "a.db")
    a = seed_files_demo(store, tmp_path / "m", tasks=15, seed=11)
    img = tmp_path / "m" / a["images"][0]
    mtime = img.stat().st_mtime_ns
    b = seed_files_demo(store, tmp_path / "m", tasks=15, seed=11)
    c = seed_files_demo(store, tmp_path / "m", tasks=15, seed=12)
    assert img.stat().st_mtime_ns == mtime

    def content(ids):
        return [
            (tmp_path / "m" / f"demo/files/p{ids['project']}/0000/annotation_{i:06d}.json").read_text()
            for i in range(15)
        ]

    assert content(a) == content(b) != content(c)
    assert a["counts_by_status"] == b["counts_by_status"]
    assert a["project"] != b["project"]
    # many units share one image file
    rows = store.execute(
        "SELECT COUNT(DISTINCT path), COUNT(*) FROM files WHERE specification_name = 'image_1'"
    ).fetchone()
    assert rows[0] <= 6 and rows[1] == 45
    assert "files" in DEMOS


def test_store_is_wal_and_usable_from_two_connections(tmp_path):
    s1 = Store(tmp_path / "x.db")
    s2 = Store(tmp_path / "x.db")
    assert s1.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s1.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    dc = s1.create_data_collection(
        "dc", [{"name": "img", "is_primary": True}, {"name": "ann", "file_type": "json"}]
    )
    du = s1.create_data_unit(
        dc, files={"img": {"path": "a/b.jpg"}, "ann": {"url": "http://example.invalid/x.json?sig=1"}}
    )
    files = {f["specification_name"]: f for f in s2.data_unit_files(du)}
    assert files["img"]["is_primary"] and files["img"]["file_name_original"] == "b.jpg"
    assert files["ann"]["file_name_original"] == "x.json" and files["ann"]["file_type"] == "json"
    with pytest.raises(ValueError):
        s1.create_data_unit(dc, files={"img": {"path": "a", "url": "http://x"}})
    pid = s1.create_project("p", dc)
    ids = s1.create_tasks_bulk(pid, [{"status": "pending"}, {"status": "done", "data_unit": du}])
    assert s2.count_tasks(TaskQuery(project=pid, statuses=["pending"])) == 1
    s1.update_task(ids[0], status="done")
    assert (
        s2.count_tasks(TaskQuery(project=pid, statuses=["pending"])) == 0
    )  # no stale cache across processes
    assert s2.task_ids(TaskQuery(project=pid, statuses=["done"])) == ids
    assert s1.annotate_task(ids[1], {"x": 1}, schema="any") and not s1.annotate_task(10**9, {})
    assert s2.history_counts(project_id=pid) == {ids[1]: 1}
    with pytest.raises(sqlite3.IntegrityError):
        s1.execute(
            "INSERT INTO tasks (id, project_id, created_at, updated_at) VALUES (?, ?, '', '')", (ids[0], pid)
        )
    s1.close()
    s2.close()
