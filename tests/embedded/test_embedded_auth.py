"""Auth on every endpoint, tenant, latency, restart, and the server process itself."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

ENDPOINTS = [
    ("GET", "/projects/{project}/"),
    ("GET", "/data_collections/{dc}/?expand=file_specifications"),
    ("GET", "/sdk/tasks/?project={project}&fields=id"),
    ("GET", "/tasks/{task}/?fields=id,data,data_unit&expand=data_unit"),
    ("PATCH", "/tasks/{task}/"),
    ("GET", "/data_units/{du}/?expand=files"),
    ("PUT", "/tasks/{task}/annotate_task_data/"),
    ("GET", "/plugin_releases/1/"),
    ("GET", "/serve_applications/?plugin_code=x&job__agent=1"),
    ("GET", "/agents/?id=1"),
    ("POST", "/plugins/x/run/"),
    ("POST", "/jobs/"),
    ("GET", "/jobs/1/"),
    ("PATCH", "/jobs/1/"),
    ("POST", "/logs/"),
    ("GET", "/logs/"),
    ("POST", "/_local/seed/"),
    ("GET", "/_local/tasks/{task}/history/"),
    ("GET", "/_local/faults/"),
    ("GET", "/no/such/path/"),
]


def _fmt(path: str, demo: dict) -> str:
    return path.format(
        project=demo["project"],
        dc=demo["data_collection"],
        task=demo["task_ids"]["first"],
        du=demo["data_units"]["first"],
    )


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest.mark.parametrize(
    "headers,detail",
    [
        ({}, "Authentication credentials were not provided."),
        ({"Synapse-Access-Token": "Token wrong-token"}, "Invalid token."),
        ({"Authorization": "Token wrong-token"}, "Invalid token."),
        ({"Synapse-Access-Token": "Bearer {token}"}, "Invalid token."),
        ({"Synapse-Access-Token": "{token}"}, "Invalid token."),
    ],
    ids=["missing", "wrong", "wrong-authorization", "wrong-keyword", "no-keyword"],
)
def test_401_without_a_valid_token_and_nothing_leaks(platform, demo, anon, method, path, headers, detail):
    h = {k: v.format(token=platform.token) for k, v in headers.items()}
    body = {"action": "submit", "data": {"leak": True}} if method in ("PUT", "POST", "PATCH") else None
    r = anon.request(method, _fmt(path, demo), headers=h, json=body)
    assert r.status_code == 401
    assert r.json() == {"detail": detail}
    assert r.headers["www-authenticate"] == "Token"
    assert platform.token not in r.text
    # nothing was applied
    assert platform.store.history_counts([demo["task_ids"]["first"]]) == {}


def test_both_auth_headers_work_and_health_needs_none(platform, demo, anon):
    assert anon.get("/health/").status_code == 200
    for header in ("Synapse-Access-Token", "Authorization"):
        r = anon.get(f"/projects/{demo['project']}/", headers={header: f"Token {platform.token}"})
        assert r.status_code == 200 and r.json()["id"] == demo["project"]


def test_tenant_is_checked_after_the_token(remote_like):
    url = remote_like.url
    token_h = {"Synapse-Access-Token": f"Token {remote_like.token}"}
    pid = remote_like.store.create_project("tenant project")
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get(f"/projects/{pid}/", headers=remote_like.headers).status_code == 200
        r = c.get(f"/projects/{pid}/", headers=token_h)
        assert r.status_code == 403 and list(r.json()) == ["detail"]
        r = c.get(f"/projects/{pid}/", headers={**token_h, "Synapse-Tenant": "Token other"})
        assert r.status_code == 403 and "tenant project" not in r.text
        r = c.get(f"/projects/{pid}/", headers={"Synapse-Tenant": "Token acme"})
        assert r.status_code == 401


def test_latency_option_delays_every_answer(remote_like, platform):
    with httpx.Client(base_url=remote_like.url, timeout=10) as c:
        c.get("/health/")
        for path, headers in (("/health/", {}), ("/projects/1/", {}), ("/projects/1/", remote_like.headers)):
            t0 = time.perf_counter()
            c.get(path, headers=headers)
            assert time.perf_counter() - t0 >= 0.14
    with httpx.Client(base_url=platform.url, timeout=10) as c:
        c.get("/health/")
        t0 = time.perf_counter()
        for _ in range(5):
            c.get("/health/")
        assert (time.perf_counter() - t0) / 5 < 0.1


def test_faults_endpoint_is_404_when_disabled(remote_like):
    with httpx.Client(base_url=remote_like.url, headers=remote_like.headers, timeout=10) as c:
        for method in ("GET", "POST", "DELETE"):
            r = c.request(method, "/_local/faults/", json={"error_rate": 1.0})
            assert r.status_code == 404 and r.json() == {"detail": "Not found."}
        assert c.get("/health/").status_code == 200
    with pytest.raises(RuntimeError, match="fault injection is off"):
        remote_like.set_faults(error_rate=1.0)


def test_token_not_on_command_line_and_restart_keeps_port_and_data(remote_like):
    cmdline = " ".join(psutil.Process(remote_like.pid).cmdline())
    assert remote_like.token not in cmdline and "totask_ray.embedded.server" in cmdline
    url, old_pid = remote_like.url, remote_like.pid
    pid = remote_like.store.create_project("survives restart")
    remote_like.restart()
    assert remote_like.url == url and remote_like.pid != old_pid
    with httpx.Client(base_url=url, headers=remote_like.headers, timeout=10) as c:
        assert c.get(f"/projects/{pid}/").json()["title"] == "survives restart"
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE


def test_stop_refuses_connections_and_context_manager(tmp_path):
    from totask_ray.embedded.server import LocalPlatform

    with LocalPlatform(tmp_path / "p", token="fixed-token") as lp:
        assert lp.token == "fixed-token" and lp.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{lp.url}/health/").status_code == 200
        assert "fixed-token" not in repr(lp)
        url = lp.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health/", timeout=2)
    assert (tmp_path / "p" / "platform.db").exists()
