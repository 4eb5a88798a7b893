"""Plugin releases, serve applications, agents, plugin runs (with and without a runner), jobs, logs."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from helpers import follow_pages, serve_in_thread

from totask_ray.embedded.app import create_app
from totask_ray.embedded.runner import NO_RUNNER_DETAIL, PluginRunError
from totask_ray.embedded.store import Store

CONFIG = {
    "name": "Echo detector",
    "actions": {
        "inference": {"required_resources": {"required_cpu_count": 1, "required_gpu_count": 0}},
        "deployment": {"serve_options": {"batch": {"max_batch_size": 8}}},
    },
}


@pytest.fixture(scope="module")
def plugins(platform) -> dict[str, Any]:
    s = platform.store
    code = "echo-plugin-test"
    r1 = s.create_plugin_release(code, "1.0.0", CONFIG)
    r2 = s.create_plugin_release(code, "1.1.0", CONFIG)
    agent = s.create_agent("agent-a", url="http://127.0.0.1:9/agent", status="connected", token="agent-token")
    other_agent = s.create_agent("agent-b")
    apps = [
        s.create_serve_application(
            f"{code}@1.0.0", plugin_release_id=r1, status="RUNNING", agent_id=agent, route_prefix="/abc"
        ),
        s.create_serve_application(f"{code}@1.1.0", plugin_release_id=r2, status="DEPLOYING", agent_id=agent),
        s.create_serve_application(
            f"{code}@1.1.0", plugin_release_id=r2, status="UNHEALTHY", agent_id=other_agent
        ),
    ]
    return {"code": code, "r1": r1, "r2": r2, "agent": agent, "other_agent": other_agent, "apps": apps}


def test_plugin_release(client, plugins):
    r = client.get(f"/plugin_releases/{plugins['r2']}/").json()
    assert r["id"] == plugins["r2"] and r["plugin"] == plugins["code"] and r["version"] == "1.1.0"
    assert r["config"]["code"] == plugins["code"]
    assert r["config"]["actions"]["deployment"]["serve_options"]["batch"]["max_batch_size"] == 8
    assert client.get("/plugin_releases/99999999/").status_code == 404


def test_serve_applications_filter_and_paginate(client, platform, plugins):
    r = client.get(
        "/serve_applications/", params={"plugin_code": plugins["code"], "job__agent": plugins["agent"]}
    ).json()
    assert r["count"] == 2 and r["next"] is None
    assert [a["status"] for a in r["results"]] == ["RUNNING", "DEPLOYING"]
    a = r["results"][0]
    assert set(a) >= {
        "id",
        "name",
        "status",
        "plugin_release",
        "plugin_code",
        "version",
        "agent",
        "job",
        "route_prefix",
    }
    assert a["plugin_release"] == plugins["r1"] and a["version"] == "1.0.0" and a["route_prefix"] == "/abc"
    ids, pages = follow_pages(
        client, {"plugin_code": plugins["code"], "page_size": 1}, "/serve_applications/"
    )
    assert ids == plugins["apps"] and len(pages) == 3
    assert client.get("/serve_applications/", params={"plugin_code": "nothing-here"}).json()["count"] == 0
    r = client.get("/serve_applications/", params={"plugin_code": plugins["code"], "agent_id": 1})
    assert r.status_code == 400 and "agent_id" in r.json()
    assert client.get("/serve_applications/", params={"job__agent": "x"}).status_code == 400
    # the status changes as the lifecycle moves on
    platform.store.set_serve_application_status(plugins["apps"][1], "RUNNING", job_id=42)
    got = client.get(f"/serve_applications/{plugins['apps'][1]}/").json()
    assert got["status"] == "RUNNING" and got["job"] == 42
    with pytest.raises(ValueError):
        platform.store.set_serve_application_status(plugins["apps"][1], "BOGUS")


def test_agents(client, plugins):
    r = client.get("/agents/", params={"id": plugins["agent"]}).json()
    assert r["count"] == 1
    assert r["results"] == [
        {
            "id": plugins["agent"],
            "name": "agent-a",
            "url": "http://127.0.0.1:9/agent",
            "status": "connected",
            "token": "agent-token",
        }
    ]
    assert client.get("/agents/", params={"id": 99999999}).json()["count"] == 0
    assert client.get("/agents/", params={"id": "x"}).status_code == 400
    assert client.get(f"/agents/{plugins['other_agent']}/").json()["name"] == "agent-b"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"action": "deployment", "surprise": 1}, "surprise"),
        ({"params": {}}, "action"),
        ({"action": "train"}, "action"),
        ({"action": "inference", "params": []}, "params"),
        ({"action": "inference", "agent": "one"}, "agent"),
        ({"action": "inference", "agent": 99999999}, "agent"),
        ({"action": "deployment", "job_id": 99999999}, "job_id"),
        ({"action": "deployment", "debug": "yes"}, "debug"),
        ({"action": "deployment", "version": 1}, "version"),
    ],
)
def test_run_validation(client, plugins, body, field):
    r = client.post(f"/plugins/{plugins['code']}/run/", json=body)
    assert r.status_code == 400 and field in r.json(), r.text


def test_run_without_runner_is_503_and_unknown_plugin_404(client, plugins):
    body = {"agent": plugins["agent"], "action": "deployment", "params": {"num_cpus": 1}, "language": "ko"}
    r = client.post(f"/plugins/{plugins['code']}/run/", json=body)
    assert r.status_code == 503 and r.json() == {"detail": NO_RUNNER_DETAIL}
    r = client.post("/plugins/no-such-plugin/run/", json={"action": "inference"})
    assert r.status_code == 404
    r = client.post(f"/plugins/{plugins['code']}/run/", json={"action": "inference", "version": "9.9.9"})
    assert r.status_code == 404


class FakeRunner:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.attached: Store | None = None

    def attach(self, store: Store) -> None:
        self.attached = store

    async def deploy(self, release: dict, params: dict, agent: dict | None, job_id: int) -> dict:
        self.calls.append(("deploy", release["version"], params, agent and agent["id"], job_id))
        if params.get("fail"):
            raise PluginRunError(409, "cannot deploy: no GPU fits")
        self.attached.update_job(job_id, status="RUNNING")
        return {"serve_application": 7}

    async def infer(self, release: dict, body: dict) -> Any:
        self.calls.append(("infer", release["version"], body))
        if body["params"].get("boom"):
            raise RuntimeError("model crashed with a secret path /root/x")
        return {"detections": [{"label": "cat", "score": 0.9}], "echo": body["params"]}


@pytest.fixture(scope="module")
def with_runner(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner-platform")
    store = Store(d / "platform.db")
    runner = FakeRunner()
    rel_old = store.create_plugin_release("det", "1.0.0", CONFIG)
    rel_new = store.create_plugin_release("det", "2.0.0", CONFIG)
    agent = store.create_agent("a")
    app = create_app(store, d / "media", "runner-token", plugin_runner=runner)
    with (
        serve_in_thread(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": "Token runner-token"}) as c,
    ):
        yield {"client": c, "runner": runner, "store": store, "old": rel_old, "new": rel_new, "agent": agent}


def test_run_deployment_creates_a_job_and_calls_the_runner(with_runner):
    c, runner, store = with_runner["client"], with_runner["runner"], with_runner["store"]
    assert runner.attached is not None
    body = {"agent": with_runner["agent"], "action": "deployment", "params": {"num_cpus": 2, "num_gpus": 1}}
    r = c.post("/plugins/det/run/", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["serve_application"] == 7 and isinstance(out["job_id"], int)
    assert runner.calls[-1] == (
        "deploy",
        "2.0.0",
        {"num_cpus": 2, "num_gpus": 1},
        with_runner["agent"],
        out["job_id"],
    )
    job = c.get(f"/jobs/{out['job_id']}/").json()
    assert job["action"] == "deployment" and job["status"] == "RUNNING" and job["params"] == body["params"]
    r = c.post(
        "/plugins/det/run/", json={"action": "deployment", "params": {"fail": True}, "version": "1.0.0"}
    )
    assert r.status_code == 409 and r.json()["detail"] == "cannot deploy: no GPU fits"
    assert runner.calls[-1][1] == "1.0.0"
    assert store.get_job(r.json()["job_id"])["status"] == "FAILED"


def test_run_inference_returns_the_model_output(with_runner):
    c, runner = with_runner["client"], with_runner["runner"]
    body = {
        "agent": with_runner["agent"],
        "action": "inference",
        "version": "1.0.0",
        "params": {"json": {"image_path": "u"}},
    }
    r = c.post("/plugins/det/run/", json=body)
    assert r.status_code == 200
    assert r.json() == {"detections": [{"label": "cat", "score": 0.9}], "echo": {"json": {"image_path": "u"}}}
    kind, version, seen = runner.calls[-1]
    assert (kind, version, seen["language"]) == ("infer", "1.0.0", "ko")
    r = c.post("/plugins/det/run/", json={"action": "inference", "params": {"boom": True}, "language": "en"})
    assert r.status_code == 502 and "/root/x" not in r.text and "Traceback" not in r.text
    assert runner.calls[-1][2]["language"] == "en"


def test_jobs_create_get_patch(client):
    r = client.post("/jobs/", json={"action": "to_task", "params": {"project": 1}})
    assert r.status_code == 201
    job = r.json()
    assert job["status"] == "PENDING" and job["params"] == {"project": 1}
    jid = job["id"]
    r = client.patch(f"/jobs/{jid}/", json={"status": "RUNNING"})
    assert r.status_code == 200 and r.json()["status"] == "RUNNING"
    metrics = {"record": {"steps": {"annotate_task_data": {"success": 5, "failed": 0, "stand_by": 0}}}}
    r = client.patch(f"/jobs/{jid}/", json={"metrics_record": metrics, "progress_record": {"annotate": 0.5}})
    assert r.json()["metrics_record"] == metrics and r.json()["status"] == "RUNNING"
    r = client.patch(f"/jobs/{jid}/", json={"status": "SUCCEEDED", "result": {"total": 5}})
    got = client.get(f"/jobs/{jid}/").json()
    assert (
        got["status"] == "SUCCEEDED"
        and got["result"] == {"total": 5}
        and got["progress_record"] == {"annotate": 0.5}
    )
    assert got["updated_at"] >= got["created_at"]
    for bad, field in (
        ({"status": "DONE"}, "status"),
        ({"owner": 1}, "owner"),
        ({"metrics_record": [1]}, "metrics_record"),
    ):
        r = client.patch(f"/jobs/{jid}/", json=bad)
        assert r.status_code == 400 and field in r.json()
    assert client.get(f"/jobs/{jid}/").json()["status"] == "SUCCEEDED"
    assert client.patch("/jobs/99999999/", json={"status": "FAILED"}).status_code == 404
    assert client.get("/jobs/99999999/").status_code == 404
    r = client.post("/jobs/", json={"params": {}})
    assert r.status_code == 400 and "action" in r.json()
    assert client.post("/jobs/", json={"action": "x", "agent": 1, "bogus": 2}).status_code == 400


def test_logs(client):
    jid = client.post("/jobs/", json={"action": "to_task"}).json()["id"]
    entries = [
        {
            "event": "task",
            "data": {"task_id": 1, "ok": True},
            "datetime": "2025-01-01T00:00:00Z",
            "job": jid,
            "step": "annotate",
            "level": "info",
        },
        {"event": "progress", "data": {"pct": 50}, "job": jid},
    ]
    r = client.post("/logs/", json=entries)
    assert r.status_code == 201 and len(r.json()) == 2 and all("id" in e for e in r.json())
    got = client.get("/logs/", params={"job": jid}).json()
    assert got["count"] == 2 and [e["event"] for e in got["results"]] == ["task", "progress"]
    assert got["results"][0]["data"] == {"task_id": 1, "ok": True}
    r = client.post("/logs/", json=[{"event": "ok"}, {"data": {}}, {"event": "x", "bogus": 1}])
    assert r.status_code == 400 and isinstance(r.json(), list) and r.json()[0] == {}
    assert "event" in r.json()[1] and "bogus" in r.json()[2]
    assert client.get("/logs/", params={"job": jid}).json()["count"] == 2
