"""The Synapse client against the embedded platform over real HTTP: endpoints, pagination, errors,
retries (through the platform's fault mode), and that no message ever carries the token."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from helpers import config_for, good_unit, make_project

from totask_ray.platform.errors import (
    AuthenticationError,
    NotFoundError,
    PlatformConnectionError,
    PlatformError,
    PlatformResponseError,
    ServerError,
    ValidationFailed,
)
from totask_ray.platform.synapse.client import (
    AsyncSynapseClient,
    Call,
    SynapseClient,
    SynapseConfig,
    encode_filters,
)


@pytest.fixture(scope="module")
def project(platform):
    units = [good_unit(platform, i, "client") for i in range(25)]
    for i, u in enumerate(units):
        u["status"] = "pending" if i % 2 else "in_progress"
        u["assignee"] = None if i % 3 else 1
    return make_project(platform, units)


@pytest.fixture
def client(platform):
    with SynapseClient(config_for(platform, backoff_s=0.01)) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_faults(platform):
    yield
    platform.clear_faults()


def test_project_collection_and_task(client, project):
    pid, ids = project
    p = client.get_project(pid)
    assert p.id == pid and p.data_collection is not None
    dc = client.get_data_collection(p.data_collection)
    assert dc.specification_names == ["image_1", "annotation_data"]
    task = client.get_task(ids[0])
    unit = task.expanded_data_unit
    assert unit is not None and unit.primary_file().specification == "image_1"
    assert unit.files["annotation_data"].url.startswith(client.config.host)
    assert client.get_data_unit(unit.id).files.keys() == unit.files.keys()


def test_listing_follows_next_lazily_and_filters(client, project):
    pid, ids = project
    listed = list(client.iter_task_ids(pid, {}, page_size=4))
    assert listed == ids  # 7 pages of 4, every id exactly once, in order
    assert client.count_tasks(pid, {}) == len(ids)
    pending = list(client.iter_task_ids(pid, {"status": "pending"}, page_size=5))
    assert pending == [t for i, t in enumerate(ids) if i % 2]
    both = list(client.iter_task_ids(pid, {"status": "pending", "assignee": None}, page_size=5))
    assert both == [t for i, t in enumerate(ids) if i % 2 and i % 3]
    gen = client.iter_task_ids(pid, {}, page_size=2)
    assert next(gen) == ids[0]  # a generator: nothing beyond the first page was read yet


def test_filter_encoding():
    assert encode_filters({"status__in": ["a", "b"], "assignee": None, "flag": True, "n": 3}) == {
        "status__in": "a,b",
        "assignee": "null",
        "flag": "true",
        "n": "3",
    }


def test_annotate_and_history(client, platform, project):
    _, ids = project
    task = client.get_task(ids[1])
    client.annotate_task(task, {"objects": []})
    client.annotate_task(task, {"k": 1}, schema="any")
    hist = platform.store.history(ids[1])
    assert [h["data"] for h in hist[-2:]] == [{"objects": []}, {"k": 1}]
    assert hist[-1]["schema"] == "any"


def test_errors_are_typed_and_never_carry_the_token(platform, client):
    with pytest.raises(NotFoundError) as nf:
        client.get_project(10**9)
    assert nf.value.status_code == 404 and "projects/" in str(nf.value)
    bad = SynapseClient(SynapseConfig(host=platform.url, access_token="wrong-" + platform.token))
    with pytest.raises(AuthenticationError) as auth:
        bad.get_project(1)
    assert platform.token not in str(auth.value) and "wrong-" not in str(auth.value)
    with pytest.raises(ValidationFailed):
        client.run_plugin("faces", {"action": "deployment", "bogus": 1})


def test_unreachable_platform_is_a_connection_error():
    cfg = SynapseConfig(host="http://127.0.0.1:9", access_token="t", retries=1, backoff_s=0.01)
    with SynapseClient(cfg) as c, pytest.raises(PlatformConnectionError, match="could not connect"):
        c.get_project(1)


def test_retries_503_and_429_honouring_retry_after(platform, client, project):
    pid, ids = project
    platform.set_faults(error_rate=1.0, statuses=[429], retry_after_s=0.3, path_regex=f"^/projects/{pid}/$")
    c = SynapseClient(config_for(platform, retries=2, backoff_s=0.01))
    t0 = time.monotonic()
    with pytest.raises(PlatformError) as info:
        c.get_project(pid)
    assert info.value.status_code == 429
    assert time.monotonic() - t0 >= 0.55  # two waits of Retry-After 0.3 s, not the 0.01 s backoff
    assert platform.fault_stats()["stats"]["errors"] == 3  # one try and two retries
    platform.set_faults(error_rate=0.5, statuses=[503], retry_after_s=0, seed=1, path_regex="^/tasks/")
    for tid in ids:  # every call gets through despite one request in two failing
        assert client.get_task(tid).id == tid
    assert platform.fault_stats()["stats"]["errors"] > 3


def test_non_idempotent_post_is_not_replayed_after_502(platform, client):
    platform.set_faults(error_rate=1.0, statuses=[502], retry_after_s=0, path_regex="^/logs/")
    with pytest.raises(ServerError):
        client.post_logs([{"event": "x", "data": {}, "datetime": "2025-01-01T00:00:00Z", "level": "info"}])
    assert platform.fault_stats()["stats"]["errors"] == 1  # a 502 may have been applied: never replayed
    platform.set_faults(error_rate=1.0, statuses=[503], retry_after_s=0, path_regex="^/logs/")
    c = SynapseClient(config_for(platform, retries=2, backoff_s=0.01))
    with pytest.raises(ServerError):
        c.post_logs([])
    assert platform.fault_stats()["stats"]["errors"] == 3  # a 503 was refused before acting: replayed


def test_a_next_link_to_another_host_is_refused(platform):
    cfg = config_for(platform)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"count": 2, "next": "http://evil.example/sdk/tasks/?page=2", "results": [{"id": 1}]}
        )

    c = SynapseClient(cfg, transport=httpx.MockTransport(handler))  # a fake: the real server never does this
    with pytest.raises(PlatformResponseError, match="another host"):
        list(c.iter_task_ids(1, {}))


def test_malformed_listing_is_a_response_error(platform):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"results": [{"id": "x"}]})

    c = SynapseClient(
        config_for(platform), transport=httpx.MockTransport(handler)
    )  # a fake: injects a bad shape
    with pytest.raises(PlatformResponseError, match="count"):
        c.task_id_page(1, {})


def test_async_client_matches_sync(platform, project):
    pid, ids = project

    async def go():
        async with AsyncSynapseClient(config_for(platform)) as c:
            tasks = await asyncio.gather(*(c.get_task(t) for t in ids))
            listed = [t async for t in c.iter_task_ids(pid, {}, page_size=10)]
            return tasks, listed

    tasks, listed = asyncio.run(go())
    assert [t.id for t in tasks] == ids and listed == ids


def test_config_from_env_and_headers(platform):
    env = {
        "SYNAPSE_HOST": platform.url + "/",
        "SYNAPSE_PLUGIN_RUN_USER_TOKEN": "u-tok",
        "SYNAPSE_PLUGIN_RUN_TENANT": "ten",
    }
    cfg = SynapseConfig.from_env(env)
    assert cfg.host == platform.url
    assert cfg.headers()["Authorization"] == "Token u-tok"
    assert cfg.headers()["Synapse-Tenant"] == "Token ten"
    assert "u-tok" not in repr(cfg)
    with pytest.raises(PlatformError, match="SYNAPSE_HOST"):
        SynapseConfig.from_env({})
    with pytest.raises(PlatformError, match="token"):
        SynapseConfig.from_env({"SYNAPSE_HOST": "http://x"})
    with pytest.raises(PlatformError, match="http"):
        SynapseConfig.from_env({"SYNAPSE_HOST": "ftp://x", "SYNAPSE_ACCESS_TOKEN": "t"})


def test_call_replay_rules():
    assert Call("PUT", "x", dict).replayable
    assert not Call("POST", "x", dict).replayable
    assert Call("PATCH", "x", dict, idempotent=True).replayable
