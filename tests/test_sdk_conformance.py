"""Conformance of the embedded platform with the REAL public client, `synapse-sdk==2026.2.17`.

The SDK needs Python >= 3.12, so it lives in its own venv (`devtools.sdk_env`, built once under
`.venv-sdk/` and reused; only a machine without any Python >= 3.12 skips). Three SDK processes run
against the session platform at once:

- `sdk_conformance/run_sdk_calls.py` makes every call of the REST contract through `BackendClient`
  and prints what the SDK parsed; each test below checks one call against what the store holds;
- the SDK's own job entrypoint (`python -m synapse_sdk.plugins.entrypoint`, what a Ray job runs)
  runs its `ToTaskAction` (file method) twice, sequential and batched, with a job and a `JobLogger`.

Where the SDK and the platform disagreed (job ids as strings in logs, `url_host`), the platform was fixed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import REPO

from devtools.sdk_env import SDK_VERSION, SdkEnvError, ensure_sdk_venv, find_python312, sdk_venv_ready
from totask_ray.embedded.seeds import seed_files_demo

SCRIPT_DIR = Path(__file__).resolve().parent / "sdk_conformance"
SCRIPT = SCRIPT_DIR / "run_sdk_calls.py"

# The first run builds the venv (about 80 s and 450 MB of pip installs); later runs reuse it.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]  # the SDK's own venv (minutes to build)

STATUSES = ("pending", "in_progress", "completed", "in_review")
N_TASKS = 330  # four pages of the SDK's page_size=100
T0 = datetime(2025, 1, 1, tzinfo=UTC)
PLUGIN_CODE = "faces"
RELEASE_CONFIG = {
    "code": PLUGIN_CODE,
    "version": "1.0.0",
    "actions": {"inference": {"required_resources": {"required_cpu_count": 1}}},
}
RUN_TIMEOUT_S = 120


# -- the SDK venv ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    ready = sdk_venv_ready(REPO)
    if ready is not None:
        return ready
    python = find_python312()
    if python is None:
        reason = "no Python >= 3.12 on this machine (PATH, pyenv, uv): the real synapse-sdk cannot run"
        print(f"SKIP sdk conformance: {reason}", file=sys.stderr)
        pytest.skip(reason)
    start = time.monotonic()
    try:
        py = ensure_sdk_venv(REPO, python=python)
    except SdkEnvError as exc:
        pytest.fail(f"building the synapse-sdk venv failed:\n{exc}", pytrace=False)
    print(f"synapse-sdk venv built in {time.monotonic() - start:.1f} s ({python})", file=sys.stderr)
    return py


def _sdk_env(platform: Any, home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment for an SDK process: nothing of ours leaks in (no config file either)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(SCRIPT_DIR),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONWARNINGS": "ignore",
        "RAY_USAGE_STATS_ENABLED": "0",
        "SYNAPSE_HOST": platform.url,
        "SYNAPSE_ACCESS_TOKEN": platform.token,
    }
    env.update(extra)
    return env


# -- data on the session platform -------------------------------------------------------------------


@dataclass
class Conformance:
    """What the test made on the platform, and what the SDK processes answered."""

    project: int
    data_collection: int
    users: list[int]
    tasks: list[dict[str, Any]]  # {"id", "status", "assignee", "created_at", "data_unit"}
    units: dict[int, dict[str, Any]]  # data unit id -> the files given to the store
    release: int
    agent: int
    agent_token: str
    job: int
    serve_app: int
    filters: dict[str, dict[str, Any]]
    annotate: dict[str, Any]
    annotate_any: dict[str, Any]
    annotate_batch: list[dict[str, Any]]
    job_updates: list[dict[str, Any]]
    logs: list[Any]
    run_plugin_posts: int | None = None
    calls: dict[str, Any] = field(default_factory=dict)
    wire: list[dict[str, Any]] = field(default_factory=list)
    sdk_version: str = ""
    seconds: float = 0.0


@dataclass
class ToTaskRun:
    name: str
    job: int
    params: dict[str, Any]
    expected: list[int]  # the task ids its filter selects
    returncode: int = -1
    stdout: str = ""
    stderr: str = ""
    result: dict[str, Any] | None = None


def _created(i: int) -> datetime:
    return T0 + timedelta(hours=i, minutes=i % 60, microseconds=i)


def _make_conformance_data(platform: Any) -> Conformance:
    store = platform.store
    tag = secrets.token_hex(3)
    users = [store.create_user(f"sdk_conformance_{tag}_{k}") for k in range(2)]
    dc = store.create_data_collection(
        f"sdk conformance {tag}",
        [
            {"name": "image_1", "is_primary": True, "is_required": True, "file_type": "image"},
            {"name": "label_json", "is_primary": False, "file_type": "json"},
        ],
    )
    project = store.create_project(f"sdk conformance {tag}", dc)

    rel_dir = f"sdk_conformance/{tag}"
    media = Path(platform.media_dir) / rel_dir
    media.mkdir(parents=True, exist_ok=True)
    (media / "img.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    unit_specs = []
    for i in range(N_TASKS):
        (media / f"label_{i}.json").write_text(json.dumps({"index": i, "tag": tag}))
        unit_specs.append(
            {
                "meta": {"index": i},
                "files": {
                    "image_1": {"path": f"{rel_dir}/img.jpg", "file_name_original": f"img_{i}.jpg"},
                    "label_json": {"path": f"{rel_dir}/label_{i}.json"},
                },
            }
        )
    du_ids = store.create_data_units_bulk(dc, unit_specs)
    rows = []
    for i, du in enumerate(du_ids):
        status = STATUSES[(i * 7 + i // 5) % len(STATUSES)]
        assignee = None if i % 3 == 0 else users[i % 2]
        rows.append({"data_unit": du, "status": status, "assignee": assignee, "created_at": _created(i)})
    ids = store.create_tasks_bulk(project, rows)
    tasks = [{"id": tid, **row} for tid, row in zip(ids, rows, strict=True)]
    units = {du: spec["files"] for du, spec in zip(du_ids, unit_specs, strict=True)}

    filters = {
        "all": {},
        "status": {"status": "pending"},
        "status_in_assignee": {"status__in": "pending,in_progress", "assignee": users[0]},
        "created_range": {
            "created_at__gte": _created(40).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "created_at__lte": "2025-01-09T12:00:00Z",
            "status__in": "pending,completed,in_review",
        },
        "collection_limit": {"data_collection": dc, "limit": 150},
        "small_pages": {"status": "completed", "page_size": 7},
        "none_match": {"status": "no_such_status"},
    }

    release = store.create_plugin_release(PLUGIN_CODE, "1.0.0", RELEASE_CONFIG)
    agent_token = secrets.token_hex(20)
    agent = store.create_agent(f"sdk-conformance-{tag}", url=None, status="connected", token=agent_token)
    other_agent = store.create_agent(f"sdk-conformance-other-{tag}")
    job = store.create_job("deployment", {"num_cpus": 1}, agent_id=agent)
    serve_app = store.create_serve_application(
        f"{PLUGIN_CODE}-{tag}", plugin_release_id=release, status="RUNNING", agent_id=agent, job_id=job
    )
    # Not listed: the same plugin on another agent, another plugin on the same agent.
    store.create_serve_application(
        f"{PLUGIN_CODE}-other-{tag}", plugin_release_id=release, status="DEPLOYING", agent_id=other_agent
    )
    other_release = store.create_plugin_release(f"ocr-{tag}", "0.1.0", {})
    store.create_serve_application(f"ocr-{tag}", plugin_release_id=other_release, agent_id=agent)

    job_updates = [
        {"status": "RUNNING"},
        {
            "progress_record": {
                "record": {"steps": {"annotate_task_data": {"proportion": 70, "percent": 40.0}}},
                "current_progress": {"overall": 40.0, "step": "annotate_task_data"},
            }
        },
        {
            "metrics_record": {
                "record": {"steps": {"annotate_task_data": {"success": 5, "failed": 0, "stand_by": 0}}}
            }
        },
        {"status": "SUCCEEDED", "result": {"status": "SUCCEEDED", "success_count": 5, "failed_count": 0}},
    ]
    logs = [
        [
            {
                "event": "annotate_task_data",
                "data": {"task_info": {"task_id": ids[0]}, "status": "success"},
                "datetime": "2025-01-02T03:04:05.000006+00:00",
                "job": job,
                "step": "annotate_task_data",
                "level": "info",
            },
            {"event": "message", "data": {"content": "done", "key": "TASK_DATA_COMPLETED"}, "job": job},
        ],
        {"event": "single", "data": {"n": 1}, "job": job, "level": "success"},
        # What JobLogger sends: the job id as it reads it from SYNAPSE_JOB_ID, a string.
        {"event": "job_as_string", "data": {}, "job": str(job), "step": "initialize", "level": "info"},
    ]
    return Conformance(
        project=project,
        data_collection=dc,
        users=users,
        tasks=tasks,
        units=units,
        release=release,
        agent=agent,
        agent_token=agent_token,
        job=job,
        serve_app=serve_app,
        filters=filters,
        annotate={"task": ids[1], "data": {"annotations": {"boxes": [{"x": 1, "y": 1, "w": 2, "h": 3}]}}},
        annotate_any={"task": ids[2], "data": {"free": ["form", 1]}},
        annotate_batch=[
            {"task": ids[3], "data": {"b": 3}},
            {"task": ids[4], "data": {"b": 4}, "schema": "any"},
            {"task": ids[5], "data": {"b": 5}},
        ],
        job_updates=job_updates,
        logs=logs,
    )


def _calls_spec(platform: Any, c: Conformance) -> dict[str, Any]:
    first = c.tasks[0]
    return {
        "url": platform.url,
        "token": platform.token,
        "project": c.project,
        "missing_project": 987_654_321,
        "data_collection": c.data_collection,
        "task_list": [{"name": k, "filters": v} for k, v in c.filters.items()],
        "task": first["id"],
        "data_unit": first["data_unit"],
        "annotate": c.annotate,
        "annotate_any": c.annotate_any,
        "annotate_batch": c.annotate_batch,
        "plugin_release": c.release,
        "plugin_code": PLUGIN_CODE,
        "agent": c.agent,
        "job": c.job,
        "job_updates": c.job_updates,
        "logs": c.logs,
        "url_host": "internal",
        "run_plugin": [
            {
                "name": "deployment",
                "code": PLUGIN_CODE,
                "body": {
                    "agent": c.agent,
                    "action": "deployment",
                    "params": {"num_cpus": 1, "num_gpus": 0.1},
                },
            },
            {
                "name": "inference",
                "code": PLUGIN_CODE,
                "body": {
                    "agent": c.agent,
                    "action": "inference",
                    "version": "1.0.0",
                    "params": {"model": 1, "method": "post", "json": {"image_path": "x", "threshold": 0.5}},
                },
            },
            {
                "name": "unknown_code",
                "code": "no-such-plugin",
                "body": {"agent": c.agent, "action": "deployment"},
            },
        ],
        # The SDK's transport retries a 503 three times with backoff factor 2 (0 + 4 + 8 s); the
        # attempts are the same without the waits.
        "run_plugin_backoff": 0,
    }


def _totask_runs(platform: Any) -> tuple[dict[str, Any], list[ToTaskRun]]:
    store = platform.store
    seed = seed_files_demo(store, platform.media_dir, tasks=24, seed=11)
    first, last = seed["task_ids"]["first"], seed["task_ids"]["last"]
    tasks = store.tasks_by_ids(list(range(first, last + 1)))
    agent = store.create_agent("sdk-conformance-totask")

    def selected(statuses: set[str]) -> list[int]:
        return [t["id"] for t in tasks if t["status"] in statuses]

    runs = []
    for name, statuses, extra in (
        ("sequential", {"pending", "in_progress"}, {}),
        ("batched", {"completed", "in_review"}, {"batch_size": 5}),
    ):
        params = {
            "name": f"sdk conformance {name}",
            "project": seed["project"],
            "agent": agent,
            "method": "file",
            "target_specification_name": seed["target_specification"],
            "task_filters": {"status__in": ",".join(sorted(statuses))},
            **extra,
        }
        job = store.create_job("to_task", params, agent_id=agent)
        runs.append(ToTaskRun(name=name, job=job, params=params, expected=selected(statuses)))
    return seed, runs


def _parse_result(stdout: str) -> dict[str, Any] | None:
    if "__SYNAPSE_RESULT_START__" not in stdout:
        return None
    body = stdout.split("__SYNAPSE_RESULT_START__", 1)[1].split("__SYNAPSE_RESULT_END__", 1)[0]
    return json.loads(body)


@pytest.fixture(scope="module")
def sdk(platform, sdk_python, tmp_path_factory):
    """Prepare the data, run the three SDK processes at once, and collect their answers."""
    work = tmp_path_factory.mktemp("sdk_conformance")
    c = _make_conformance_data(platform)
    seed, runs = _totask_runs(platform)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(_calls_spec(platform, c)))

    counting = True
    try:  # count the POSTs that reach plugins/{code}/run/ (a fault config that injects nothing)
        platform.set_faults(path_regex=r"^/plugins/[^/]+/run/$", methods=["POST"])
    except (RuntimeError, httpx.HTTPError):
        counting = False

    start = time.monotonic()
    procs = {
        "calls": subprocess.Popen(
            [str(sdk_python), str(SCRIPT), str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_sdk_env(platform, work),
            cwd=work,
        )
    }
    for run in runs:
        procs[run.name] = subprocess.Popen(
            [str(sdk_python), "-m", "synapse_sdk.plugins.entrypoint"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_sdk_env(
                platform,
                work,
                SYNAPSE_JOB_ID=str(run.job),
                SYNAPSE_ACTION_ENTRYPOINT="run_sdk_calls.ToTask",
                SYNAPSE_ACTION_PARAMS=json.dumps(run.params),
                SYNAPSE_LANGUAGE="en",
            ),
            cwd=work,
        )
    outputs = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
            outputs[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if counting:
            c.run_plugin_posts = platform.clear_faults()["stats"]["matched"]
    c.seconds = time.monotonic() - start

    rc, out, err = outputs["calls"]
    assert rc == 0, f"run_sdk_calls.py failed (exit {rc}):\n{err[-4000:]}"
    answer = json.loads(out.strip().splitlines()[-1])
    c.calls, c.wire, c.sdk_version = answer["calls"], answer["wire"], answer["sdk_version"]
    for run in runs:
        run.returncode, run.stdout, run.stderr = outputs[run.name]
        run.result = _parse_result(run.stdout)
    print(f"SDK processes took {c.seconds:.1f} s", file=sys.stderr)
    return c, seed, runs


@pytest.fixture(scope="module")
def conf(sdk) -> Conformance:
    return sdk[0]


def _ok(conf: Conformance, name: str) -> Any:
    outcome = conf.calls[name]
    assert outcome["ok"], f"{name}: the SDK raised {outcome}"
    return outcome["value"]


def _failed(conf: Conformance, name: str) -> dict[str, Any]:
    outcome = conf.calls[name]
    assert not outcome["ok"], f"{name}: expected an error, the SDK returned {outcome['value']!r}"
    return outcome


def _requests(conf: Conformance, method: str, path: str) -> list[dict[str, Any]]:
    return [w for w in conf.wire if w["method"] == method and w["path"] == path]


# -- the calls ------------------------------------------------------------------------------------


def test_runs_the_pinned_sdk(conf):
    assert conf.sdk_version == SDK_VERSION


def test_get_project(conf, platform):
    value = _ok(conf, "get_project")
    assert value == platform.store.get_project(conf.project)
    assert value["data_collection"] == conf.data_collection


def test_errors_map_to_the_sdk_exceptions(conf):
    missing = _failed(conf, "get_project_missing")
    assert (missing["error"], missing["status"]) == ("NotFoundError", 404)
    bad = _failed(conf, "bad_token")
    assert (bad["error"], bad["status"]) == ("AuthenticationError", 401)


def test_get_data_collection_expands_file_specifications(conf, platform):
    value = _ok(conf, "get_data_collection")
    assert value["id"] == conf.data_collection
    specs = value["file_specifications"]
    assert [s["name"] for s in specs] == ["image_1", "label_json"]
    assert [s["is_primary"] for s in specs] == [True, False]
    assert specs == platform.store.file_specifications(conf.data_collection)
    (req,) = _requests(conf, "GET", f"/data_collections/{conf.data_collection}/")
    assert req["query"] == {"expand": ["file_specifications"]}


def _expected_ids(conf: Conformance, filters: dict[str, Any]) -> list[int]:
    def keep(t: dict[str, Any]) -> bool:
        if "status" in filters and t["status"] != filters["status"]:
            return False
        if "status__in" in filters and t["status"] not in filters["status__in"].split(","):
            return False
        if "assignee" in filters and t["assignee"] != filters["assignee"]:
            return False
        if "created_at__gte" in filters:
            gte = datetime.fromisoformat(filters["created_at__gte"].replace("Z", "+00:00"))
            if t["created_at"] < gte:
                return False
        if "created_at__lte" in filters:
            lte = datetime.fromisoformat(filters["created_at__lte"].replace("Z", "+00:00"))
            if t["created_at"] > lte:
                return False
        return not ("data_collection" in filters and filters["data_collection"] != conf.data_collection)

    ids = sorted(t["id"] for t in conf.tasks if keep(t))
    return ids[: filters["limit"]] if "limit" in filters else ids


@pytest.mark.parametrize(
    "name",
    ["all", "status", "status_in_assignee", "created_range", "collection_limit", "small_pages", "none_match"],
)
def test_list_tasks_follows_pages_to_the_filtered_set(conf, name):
    """`list_tasks(params, list_all=True)` as ToTaskAction's FetchTasksStep calls it."""
    filters = conf.filters[name]
    expected = _expected_ids(conf, filters)
    value = _ok(conf, f"list_tasks:{name}")
    assert value["count"] == len(expected)
    assert value["ids"] == expected  # every page, in order, no id twice
    assert value["keys"] in ([], ["id"])  # fields=id
    page_size = filters.get("page_size", 100)
    sent = {k: [str(v)] for k, v in filters.items()} | {"fields": ["id"], "project": [str(conf.project)]}
    sent.setdefault("page_size", ["100"])  # the SDK's default
    reqs = [
        w
        for w in _requests(conf, "GET", "/sdk/tasks/")
        if {k: v for k, v in w["query"].items() if k != "page"} == sent
    ]
    assert [w["status"] for w in reqs] == [200] * max(1, math.ceil(len(expected) / page_size))
    assert "page" not in reqs[0]["query"]
    assert [w["query"].get("page") for w in reqs[1:]] == [[str(p)] for p in range(2, len(reqs) + 1)]


def test_list_tasks_spans_several_pages(conf):
    assert len(_expected_ids(conf, conf.filters["all"])) > 300
    assert len(_expected_ids(conf, conf.filters["small_pages"])) > 3 * 7


def _check_files(files: dict[str, Any], unit_files: dict[str, Any], platform: Any) -> None:
    assert set(files) == {"image_1", "label_json"}  # keyed by specification name
    assert files["image_1"]["is_primary"] is True
    assert files["label_json"]["is_primary"] is False
    assert files["image_1"]["file_name_original"] == unit_files["image_1"]["file_name_original"]
    assert files["label_json"]["file_name_original"] == unit_files["label_json"]["path"].rsplit("/", 1)[-1]
    for spec, f in files.items():
        assert f["url"].startswith(f"{platform.url}/media/")
        r = httpx.get(f["url"], timeout=10)  # usable as given, without credentials
        assert r.status_code == 200
        assert r.content == (Path(platform.media_dir) / unit_files[spec]["path"]).read_bytes()


def test_get_task_expands_its_data_unit_and_files(conf, platform):
    task = conf.tasks[0]
    value = _ok(conf, "get_task")
    assert set(value) == {"id", "data", "data_unit"}
    assert value["id"] == task["id"]
    assert value["data"] == platform.store.get_task(task["id"])["data"]
    du = value["data_unit"]
    assert isinstance(du, dict) and du["id"] == task["data_unit"]
    _check_files(du["files"], conf.units[task["data_unit"]], platform)
    (req,) = _requests(conf, "GET", f"/tasks/{task['id']}/")
    assert req["query"] == {"fields": ["id,data,data_unit"], "expand": ["data_unit"]}


def test_get_data_unit_expands_files(conf, platform):
    task = conf.tasks[0]
    value = _ok(conf, "get_data_unit")
    assert value["id"] == task["data_unit"]
    _check_files(value["files"], conf.units[task["data_unit"]], platform)


def test_annotate_task_data_lands_with_its_history(conf, platform):
    a = conf.annotate
    value = _ok(conf, "annotate_task_data")
    assert value["id"] == a["task"] and value["data"] == a["data"]
    assert platform.store.get_task(a["task"])["data"] == a["data"]
    (h,) = platform.store.history(a["task"])
    assert (h["action"], h["schema"], h["data"]) == ("submit", None, a["data"])
    (req,) = _requests(conf, "PUT", f"/tasks/{a['task']}/annotate_task_data/")
    assert req["query"] == {}


def test_annotate_task_data_with_schema_any(conf, platform):
    a = conf.annotate_any
    value = _ok(conf, "annotate_task_data_any")
    assert value["data"] == a["data"]
    (h,) = platform.store.history(a["task"])
    assert (h["action"], h["schema"], h["data"]) == ("submit", "any", a["data"])
    (req,) = _requests(conf, "PUT", f"/tasks/{a['task']}/annotate_task_data/")
    assert req["query"] == {"schema": ["any"]}


def test_annotate_task_data_batch(conf, platform):
    value = _ok(conf, "annotate_task_data_batch")
    for item in conf.annotate_batch:
        entry = value[str(item["task"])]
        assert entry["success"] is True and entry["error"] is None
        assert entry["response"]["data"] == item["data"]
        (h,) = platform.store.history(item["task"])
        assert (h["schema"], h["data"]) == (item.get("schema"), item["data"])


def test_get_plugin_release(conf):
    value = _ok(conf, "get_plugin_release")
    assert value["id"] == conf.release
    assert value["version"] == "1.0.0"
    assert value["config"] == RELEASE_CONFIG
    assert value["config"]["code"] == PLUGIN_CODE
    assert value["config"]["actions"]["inference"]["required_resources"] == {"required_cpu_count": 1}


def test_list_serve_applications_by_plugin_code_and_agent(conf, platform):
    value = _ok(conf, "list_serve_applications")
    assert value["count"] == 1 and value["next"] is None
    (app,) = value["results"]
    assert app["id"] == conf.serve_app and app["status"] == "RUNNING"
    assert app == platform.store.get_serve_application(conf.serve_app)
    (req,) = _requests(conf, "GET", "/serve_applications/")
    assert req["query"] == {"plugin_code": [PLUGIN_CODE], "job__agent": [str(conf.agent)]}


def test_list_agents_by_id(conf, platform):
    (agent,) = _ok(conf, "list_agents")  # the SDK's Agent models, dumped
    stored = platform.store.get_agent(conf.agent)
    assert {k: agent[k] for k in ("id", "name", "url", "status", "token")} == stored
    assert agent["token"] == conf.agent_token and agent["url"] is None


def test_get_job(conf):
    value = _ok(conf, "get_job")
    assert value["id"] == conf.job and value["status"] == "PENDING" and value["agent"] == conf.agent


def test_update_job_records_status_progress_metrics_and_result(conf, platform):
    merged: dict[str, Any] = {}
    for i, body in enumerate(conf.job_updates):
        merged.update(body)
        value = _ok(conf, f"update_job:{i}")
        assert {k: value[k] for k in merged} == merged
    job = platform.store.get_job(conf.job)
    assert {k: job[k] for k in merged} == merged
    assert _ok(conf, "get_job_after") == job
    assert job["status"] == "SUCCEEDED"


def test_create_logs_stores_batches_and_single_entries(conf, platform):
    batch = _ok(conf, "create_logs:0")
    single = _ok(conf, "create_logs:1")
    assert [e["event"] for e in batch] == ["annotate_task_data", "message"]
    assert [e["event"] for e in single] == ["single"]
    stored = {e["event"]: e for e in platform.store.logs(conf.job)}
    for entry in [*conf.logs[0], conf.logs[1]]:
        got = stored[entry["event"]]
        assert {k: got[k] for k in entry if k != "datetime"} == {
            k: v for k, v in entry.items() if k != "datetime"
        }
    assert [w["status"] for w in _requests(conf, "POST", "/logs/")][:2] == [201, 201]


def test_create_logs_accepts_the_job_id_as_a_string(conf, platform):
    value = _ok(conf, "create_logs:2")
    assert value[0]["event"] == "job_as_string"
    assert any(e["event"] == "job_as_string" for e in platform.store.logs(conf.job))


def test_run_plugin_without_a_ray_runner_is_a_server_error(conf):
    for name in ("deployment", "inference"):
        outcome = _failed(conf, f"run_plugin:{name}")
        assert (outcome["error"], outcome["status"]) == ("ServerError", 503)
        # The transport retried 503 and gave up: the platform's JSON detail is not what surfaces.
        assert "retries exhausted" in outcome["message"]
    missing = _failed(conf, "run_plugin:unknown_code")
    assert (missing["error"], missing["status"]) == ("NotFoundError", 404)


def test_run_plugin_503_is_retried_by_the_transport(conf):
    if conf.run_plugin_posts is None:
        pytest.skip("the session platform has no fault injection to count requests with")
    # deployment and inference: 1 + 3 retries each; the unknown code: once (404 is not retried).
    assert conf.run_plugin_posts == 4 + 4 + 1


def test_url_host_query_parameter_is_accepted(conf):
    for name in ("list_tasks", "list_serve_applications", "list_agents"):
        _ok(conf, f"url_host:{name}")


def test_url_host_query_parameter_on_plain_reads(conf):
    """The endpoints without a strict parameter check already ignore `url_host`."""
    _ok(conf, "url_host:get_task")


# -- the SDK's own ToTaskAction, run by the SDK's job entrypoint -------------------------------------


@pytest.fixture(scope="module")
def totask(sdk):
    return sdk[1], sdk[2]


def _data_file_json(platform: Any, du_id: int, spec: str) -> Any:
    (f,) = [f for f in platform.store.data_unit_files(du_id) if f["specification_name"] == spec]
    return json.loads((Path(platform.media_dir) / f["path"]).read_text())


@pytest.mark.parametrize("name", ["sequential", "batched"])
def test_totask_file_method_annotates_every_selected_task(totask, platform, name):
    seed, runs = totask
    (run,) = [r for r in runs if r.name == name]
    assert run.returncode == 0, f"the SDK entrypoint failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert len(run.expected) >= 8
    mode = "TASK_DATA_PROCESSING_BATCH" if name == "batched" else "TASK_DATA_PROCESSING_SEQUENTIAL"
    assert mode in run.stdout  # the step's own announcement of its processor
    assert run.result == {
        "status": "SUCCEEDED",
        "message": f"to_task completed. success={len(run.expected)}, failed=0",
        "total_tasks": len(run.expected),
        "success_count": len(run.expected),
        "failed_count": 0,
        "failures": [],
    }
    target = seed["target_specification"]
    for tid in run.expected:
        task = platform.store.get_task(tid)
        want = _data_file_json(platform, task["data_unit"], target)
        history = platform.store.history(tid)
        assert [(h["action"], h["schema"], h["data"]) for h in history] == [("submit", None, want)], tid
        assert task["data"] == want


def test_totask_leaves_unselected_tasks_alone(totask, platform):
    seed, runs = totask
    selected = {tid for r in runs for tid in r.expected}
    first, last = seed["task_ids"]["first"], seed["task_ids"]["last"]
    for tid in range(first, last + 1):
        if tid not in selected:
            assert platform.store.history(tid) == [], tid


@pytest.mark.parametrize("name", ["sequential", "batched"])
def test_totask_job_records(totask, platform, name):
    _, runs = totask
    (run,) = [r for r in runs if r.name == name]
    job = platform.store.get_job(run.job)
    assert job["status"] == "SUCCEEDED"
    assert job["result"] == run.result
    n = len(run.expected)
    steps = job["metrics_record"]["record"]["steps"]
    assert steps["annotate_task_data"] == {"success": n, "failed": 0, "stand_by": 0}
    progress = job["progress_record"]
    assert progress["current_progress"]["overall"] == pytest.approx(100.0)
    assert set(progress["record"]["steps"]) == {
        "initialize",
        "prepare",
        "fetch_tasks",
        "annotate_task_data",
        "finalize",
    }


@pytest.mark.parametrize("name", ["sequential", "batched"])
def test_totask_job_logs_reach_the_platform(totask, platform, name):
    _, runs = totask
    (run,) = [r for r in runs if r.name == name]
    events = [e["event"] for e in platform.store.logs(run.job)]
    assert events.count("annotate_task_data") == len(run.expected)
    assert "message" in events
