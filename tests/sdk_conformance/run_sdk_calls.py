"""Drive the public `synapse-sdk` client against a Synapse-compatible platform; print what it parsed.

Runs under the SDK's own venv (Python >= 3.12, `synapse-sdk==2026.2.17`), never under the project's:
it imports neither `totask_ray` nor pytest. Two uses:

1. `python run_sdk_calls.py SPEC.json` makes every call of the REST contract through
   `synapse_sdk.clients.backend.BackendClient` with the ids in SPEC.json and prints ONE JSON object
   on stdout: `{"sdk_version", "python", "calls": {name: outcome}, "wire": [...]}`. An outcome is
   `{"ok": true, "value": <what the SDK returned, JSON-ed>, ...}` or
   `{"ok": false, "error": <exception class>, "status": <status_code>, "detail": ..., "message"}`.
   `wire` lists the final HTTP response of every request the SDK made (method, path, query, status)
   as seen by a `requests` response hook (transport-level retries are not listed).

2. `ToTask` below is a complete ToTask plugin action (file and inference methods): run the SDK's
   own job entrypoint with it, exactly as a Ray job runs a plugin:

       SYNAPSE_HOST=... SYNAPSE_ACCESS_TOKEN=... SYNAPSE_JOB_ID=<job id> \\
       SYNAPSE_ACTION_ENTRYPOINT=run_sdk_calls.ToTask SYNAPSE_ACTION_PARAMS='{"name": ...}' \\
       PYTHONPATH=<this dir> python -m synapse_sdk.plugins.entrypoint

SPEC.json keys (all optional except url/token): url, token, tenant, project, data_collection,
task_list (a list of `{"name", "filters"}`), task, data_unit, annotate (`{"task", "data"}`),
annotate_any (same, sent with `schema="any"`), annotate_batch (a list of `{"task", "data", "schema"}`
for `annotate_task_data_batch`), url_host (repeat a few reads with `BackendClient(url_host=...)`), plugin_release, plugin_code, agent, job, job_updates
(a list of PATCH bodies), logs (a list of log entries), run_plugin (a list of `{"name", "code",
"body"}`), run_plugin_backoff (the transport backoff factor for run_plugin; the SDK default is 2),
missing_project (an id that does not exist).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from synapse_sdk.clients.backend import BackendClient
from synapse_sdk.plugins.actions.to_task import ToTaskAction


class ToTask(ToTaskAction):
    """A complete ToTask plugin action, as the SDK's pre-annotation template lays it out.

    file method: each task gets the JSON of its target-specification file, as downloaded from the
    URL the platform gave. inference method: the request params follow the template's example
    (`{"model", "method": "post", "json": {"image_path": <primary file url>, **pre_processor_params}}`)
    and the model's answer is the task data."""

    action_name = "to_task"

    def convert_data_from_file(
        self,
        primary_file_url: str,
        primary_file_name: str | None,
        data_file_url: str,
        data_file_name: str | None,
        task_data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        response = requests.get(data_file_url, timeout=15)
        response.raise_for_status()
        return response.json()

    def convert_data_from_inference(
        self, inference_data: Any, task_data: dict[str, Any] | None = None
    ) -> Any:
        return inference_data

    def setup_inference_params(
        self,
        primary_file_url: str,
        primary_file_name: str | None,
        data_files: list[dict[str, Any]],
        *,
        model_id: int | None = None,
        pre_processor_params: dict[str, Any] | None = None,
        pre_processor_config: dict[str, Any] | None = None,
        task_data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "model": model_id,
            "method": "post",
            "json": {"image_path": primary_file_url, **(pre_processor_params or {})},
        }


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def _outcome(fn, *args: Any, **kwargs: Any) -> dict[str, Any]:
    start = time.monotonic()
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # every failure is an answer to report
        return {
            "ok": False,
            "error": type(exc).__name__,
            "error_mro": [c.__name__ for c in type(exc).__mro__],
            "status": getattr(exc, "status_code", None),
            "detail": _jsonable(getattr(exc, "detail", None)),
            "message": str(exc)[:500],
            "seconds": round(time.monotonic() - start, 3),
        }
    return {"ok": True, "value": _jsonable(value), "seconds": round(time.monotonic() - start, 3)}


def _client(
    spec: dict[str, Any],
    wire: list[dict[str, Any]] | None,
    *,
    token: str | None = None,
    backoff: float | None = None,
    url_host: str | None = None,
) -> BackendClient:
    client = BackendClient(
        spec["url"], access_token=token or spec["token"], tenant=spec.get("tenant"), url_host=url_host
    )
    if backoff is not None:  # read when the session is made (the first request)
        client._retry_config["backoff_factor"] = backoff
    if wire is None:
        return client

    def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        parts = urlsplit(response.request.url)
        wire.append(
            {
                "method": response.request.method,
                "path": parts.path,
                "query": parse_qs(parts.query),
                "status": response.status_code,
            }
        )

    client.requests_session.hooks["response"].append(record)
    return client


def _list_tasks(client: BackendClient, project: int, filters: dict[str, Any]) -> dict[str, Any]:
    # What FetchTasksStep does: the filters, then fields=id and the project, list_all=True.
    params = dict(filters)
    params["fields"] = "id"
    params["project"] = project
    items, count = client.list_tasks(params=params, list_all=True)
    rows = list(items)
    return {"count": count, "ids": [r.get("id") for r in rows], "keys": sorted({k for r in rows for k in r})}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    wire: list[dict[str, Any]] = []
    client = _client(spec, wire)
    calls: dict[str, Any] = {}

    if "project" in spec:
        calls["get_project"] = _outcome(client.get_project, spec["project"])
    if "missing_project" in spec:
        calls["get_project_missing"] = _outcome(client.get_project, spec["missing_project"])
        calls["bad_token"] = _outcome(_client(spec, wire, token="not-the-token").get_project, spec["project"])
    if "data_collection" in spec:
        calls["get_data_collection"] = _outcome(client.get_data_collection, spec["data_collection"])
    for item in spec.get("task_list", []):
        calls[f"list_tasks:{item['name']}"] = _outcome(_list_tasks, client, spec["project"], item["filters"])
    if "task" in spec:
        calls["get_task"] = _outcome(
            client.get_task, spec["task"], params={"fields": "id,data,data_unit", "expand": "data_unit"}
        )
    if "data_unit" in spec:
        calls["get_data_unit"] = _outcome(client.get_data_unit, spec["data_unit"], params={"expand": "files"})
    if "annotate" in spec:
        a = spec["annotate"]
        calls["annotate_task_data"] = _outcome(
            client.annotate_task_data, a["task"], data={"action": "submit", "data": a["data"]}
        )
    if "annotate_any" in spec:
        a = spec["annotate_any"]
        calls["annotate_task_data_any"] = _outcome(
            client.annotate_task_data, a["task"], data={"action": "submit", "data": a["data"]}, schema="any"
        )
    if "annotate_batch" in spec:
        items = [
            {"task_id": a["task"], "data": {"action": "submit", "data": a["data"]}, "schema": a.get("schema")}
            for a in spec["annotate_batch"]
        ]
        calls["annotate_task_data_batch"] = _outcome(client.annotate_task_data_batch, items, max_workers=4)
    if "plugin_release" in spec:
        calls["get_plugin_release"] = _outcome(client.get_plugin_release, spec["plugin_release"])
    if "plugin_code" in spec:
        serve_params = {"plugin_code": spec["plugin_code"], "job__agent": spec["agent"]}
        calls["list_serve_applications"] = _outcome(client.list_serve_applications, params=serve_params)
    if "agent" in spec:
        calls["list_agents"] = _outcome(client.list_agents, params={"id": spec["agent"]})
    if "job" in spec:
        calls["get_job"] = _outcome(client.get_job, spec["job"])
        for i, body in enumerate(spec.get("job_updates", [])):
            calls[f"update_job:{i}"] = _outcome(client.update_job, spec["job"], body)
        calls["get_job_after"] = _outcome(client.get_job, spec["job"])
    for i, entry in enumerate(spec.get("logs", [])):
        calls[f"create_logs:{i}"] = _outcome(client.create_logs, entry)
    if spec.get("url_host") and "project" in spec:
        # BackendClient(url_host=...) (or SYNAPSE_PLUGIN_RUN_URL_HOST in a plugin run) adds
        # ?url_host=... to EVERY request. Not recorded in `wire`.
        hosted = _client(spec, None, url_host=spec["url_host"])
        calls["url_host:get_task"] = _outcome(
            hosted.get_task, spec["task"], params={"fields": "id,data,data_unit", "expand": "data_unit"}
        )
        calls["url_host:list_tasks"] = _outcome(_list_tasks, hosted, spec["project"], {})
        calls["url_host:list_serve_applications"] = _outcome(
            hosted.list_serve_applications,
            params={"plugin_code": spec.get("plugin_code"), "job__agent": spec.get("agent")},
        )
        calls["url_host:list_agents"] = _outcome(hosted.list_agents, params={"id": spec.get("agent")})
    if spec.get("run_plugin"):
        # A client of its own: the SDK retries 502/503/504 on POST too, with backoff factor 2.
        runner = _client(spec, wire, backoff=spec.get("run_plugin_backoff"))
        for item in spec["run_plugin"]:
            calls[f"run_plugin:{item['name']}"] = _outcome(runner.run_plugin, item["code"], item["body"])

    from importlib.metadata import version

    return {
        "sdk_version": version("synapse-sdk"),
        "python": sys.version.split()[0],
        "calls": calls,
        "wire": wire,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} SPEC.json", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        spec = json.load(fh)
    out = run(spec)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
