"""Fault injection: error rate honoured, Retry-After sent, errored requests not applied, slowness."""

from __future__ import annotations

import time
from collections import Counter

import pytest


@pytest.fixture
def faults(platform):
    platform.clear_faults()
    try:
        yield platform
    finally:
        platform.clear_faults()


def _task(platform) -> int:
    pid = platform.store.create_project("faults")
    return platform.store.create_task(pid, status="pending")


def test_error_rate_retry_after_and_nothing_applied(faults, client):
    platform = faults
    tid = _task(platform)
    path = f"/tasks/{tid}/annotate_task_data/"
    cfg = platform.set_faults(
        error_rate=0.3, statuses=[503, 429], retry_after_s=2, path_regex=f"^{path}$", methods=["put"], seed=1
    )
    assert cfg["faults"]["methods"] == ["PUT"]
    n, ok, errors, last_ok = 200, 0, Counter(), None
    for i in range(n):
        r = client.put(path, json={"action": "submit", "data": {"i": i}})
        if r.status_code == 200:
            ok += 1
            last_ok = i
        else:
            assert r.status_code in (503, 429)
            assert r.headers["retry-after"] == "2"
            assert r.json()["detail"].startswith("Injected fault")
            errors[r.status_code] += 1
    total = sum(errors.values())
    assert 0.18 * n <= total <= 0.42 * n, total
    assert set(errors) == {503, 429}
    # errored requests never reached the handler: history holds exactly the answered writes
    assert platform.store.history_counts([tid]) == {tid: ok}
    assert platform.store.get_task(tid)["data"] == {"i": last_ok}
    stats = platform.fault_stats()["stats"]
    assert stats["matched"] == n and stats["errors"] == total
    assert stats["by_status"] == {str(k): v for k, v in errors.items()}
    # requests outside the regex or the methods are untouched
    assert all(client.get(f"/tasks/{tid}/").status_code == 200 for _ in range(20))
    # after clearing, nothing fails
    platform.clear_faults()
    assert all(client.put(path, json={"action": "submit", "data": {}}).status_code == 200 for _ in range(20))


def test_max_in_a_row_bounds_a_run_of_errors_on_one_request(faults, client):
    """At error_rate 1 every request fails, except that one method and path never fails more than
    `max_in_a_row` times in a row: the next try gets through, and the count starts again."""
    platform = faults
    tid = _task(platform)
    path = f"/tasks/{tid}/"
    platform.set_faults(
        error_rate=1.0, statuses=[503], retry_after_s=0, path_regex="^/tasks/", max_in_a_row=2
    )
    codes = [client.get(path).status_code for _ in range(6)]
    assert codes == [503, 503, 200, 503, 503, 200], codes
    assert client.get(f"/tasks/{tid}/?other=1").status_code == 503  # the query is not the path: same run
    other = _task(platform)
    assert client.get(f"/tasks/{other}/").status_code == 503  # another path has its own run
    bad = client.post("/_local/faults/", json={"max_in_a_row": -1})
    assert bad.status_code == 400 and "max_in_a_row" in bad.json(), bad.text
    platform.clear_faults()


def test_health_and_admin_are_never_faulted(faults, client, anon):
    faults.set_faults(error_rate=1.0, statuses=[500])
    for _ in range(10):
        assert anon.get("/health/").status_code == 200
        assert client.get("/_local/faults/").status_code == 200
    r = client.get("/projects/1/")
    assert r.status_code == 500 and "retry-after" not in r.headers
    r = anon.get("/projects/1/")
    assert r.status_code == 401  # auth is checked before faults


def test_media_downloads_can_be_faulted(faults, client, demo):
    tid = demo["task_ids"]["first"]
    files = client.get(f"/tasks/{tid}/", params={"fields": "data_unit", "expand": "data_unit"}).json()[
        "data_unit"
    ]["files"]
    url = files["annotation_data"]["url"]
    faults.set_faults(error_rate=1.0, statuses=[503], retry_after_s=0.5, path_regex="^/media/demo/files/")
    r = client.get(url)
    assert r.status_code == 503 and r.headers["retry-after"] == "0.5"
    assert client.get(files["image_1"]["url"]).status_code == 200
    faults.clear_faults()
    assert client.get(url).status_code == 200


def test_slow_requests_are_slow_but_answered(faults, client):
    pid = faults.store.create_project("slow")
    faults.set_faults(slow_rate=1.0, slow_s=0.3, path_regex=f"^/projects/{pid}/$")
    t0 = time.perf_counter()
    r = client.get(f"/projects/{pid}/")
    assert r.status_code == 200 and r.json()["title"] == "slow"
    assert time.perf_counter() - t0 >= 0.29
    t0 = time.perf_counter()
    assert client.get("/health/").status_code == 200
    assert time.perf_counter() - t0 < 0.25
    assert faults.fault_stats()["stats"]["slowed"] == 1


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": "high"}, "error_rate"),
        ({"statuses": [200]}, "statuses"),
        ({"statuses": []}, "statuses"),
        ({"path_regex": "(unclosed"}, "path_regex"),
        ({"methods": "GET"}, "methods"),
        ({"slow_s": -1}, "slow_s"),
        ({"seed": 1.5}, "seed"),
        ({"drop_rate": 0.1}, "drop_rate"),
    ],
)
def test_bad_fault_config_is_400(faults, client, cfg, field):
    r = client.post("/_local/faults/", json=cfg)
    assert r.status_code == 400 and field in r.json()
    assert client.get("/_local/faults/").json()["faults"] is None
