"""The file method end to end: a real Ray cluster, the real embedded platform over HTTP.

Outcomes are checked on the platform afterwards (task data and the annotation history), not only
in the counters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import config_for, file_server, good_unit, make_project, read_report, write_media

from totask_ray import ToTask, ToTaskError, run_to_task
from totask_ray.embedded.seeds import seed_files_demo
from totask_ray.result import RunStatus

pytestmark = pytest.mark.usefixtures("ray_cluster")

FILE_PARAMS = {"name": "File_Job", "method": "file", "target_specification_name": "annotation_data"}


@pytest.mark.slow
def test_thousand_tasks_written_exactly_as_their_files(platform, tmp_path):
    seeded = seed_files_demo(platform.store, platform.media_dir, tasks=1000, seed=7)
    project = seeded["project"]
    filters = {"status__in": ["pending", "in_progress"]}
    report = tmp_path / "report.jsonl"

    result = run_to_task(
        {**FILE_PARAMS, "project": project, "task_filters": filters},
        platform=config_for(platform),
        report=report,
        create_job=True,
        progress_bar=False,
    )

    counts = seeded["counts_by_status"]
    matched = counts.get("pending", 0) + counts.get("in_progress", 0)
    assert result.status is RunStatus.SUCCEEDED
    assert (result.total_tasks, result.success_count, result.failed_count) == (matched, matched, 0)
    assert result.metrics.model_dump() == {
        "total": matched,
        "success": matched,
        "failed": 0,
        "stand_by": 0,
        "empty": 0,
    }
    assert f"{matched} succeeded, 0 failed" in result.message

    store = platform.store
    outcomes = read_report(report)
    assert len(outcomes) == matched
    writes = store.history_counts(project_id=project)
    first, last = seeded["task_ids"]["first"], seeded["task_ids"]["last"]
    for tid in range(first, last + 1):
        task = store.get_task(tid)
        if task["status"] in ("pending", "in_progress"):
            unit_files = {f["specification_name"]: f for f in store.data_unit_files(task["data_unit"])}
            on_disk = json.loads(
                (Path(platform.media_dir) / unit_files["annotation_data"]["path"]).read_text()
            )
            assert task["data"] == on_disk, f"task {tid} holds something else than its file"
            assert writes.get(tid) == 1, f"task {tid} was written {writes.get(tid, 0)} times"
            assert outcomes[tid]["status"] == "success" and outcomes[tid]["written"]
        else:
            assert not task["data"], f"task {tid} is outside the filters but was written"
            assert tid not in writes


def test_per_task_failures_fail_only_their_task(platform, tmp_path):
    big = {"objects": [], "padding": "x" * 5000}
    routes = {
        "/bad.json": (200, "application/json", b"{not json", {}),
        "/page.html": (200, "text/html", b"<html>login</html>", {}),
    }
    with file_server(routes) as other:
        units = [good_unit(platform, i, "pertask") for i in range(6)]
        bad = {
            "missing target file": {"files": {"image_1": {"path": "pertask/img.png"}}},
            "404 url": {"files": {"image_1": {"path": "pertask/img.png"}, "annotation_data": {"url": f"{other}/gone.json"}}},
            "invalid json": {"files": {"image_1": {"path": "pertask/img.png"},
                                       "annotation_data": {"path": write_media(platform, "pertask/bad.json", "{oops")}}},
            "schema violation": {"files": {"image_1": {"path": "pertask/img.png"}, "annotation_data": {
                "path": write_media(platform, "pertask/schema.json", {"objects": [{"id": "a", "class_id": 1, "type": "bbox",
                                                                                  "coordinates": {"x": 1, "y": 1, "width": -4, "height": 2}}]})}}},
            "oversized": {"files": {"image_1": {"path": "pertask/img.png"},
                                    "annotation_data": {"path": write_media(platform, "pertask/big.json", big)}}},
            "html page": {"files": {"image_1": {"path": "pertask/img.png"}, "annotation_data": {"url": f"{other}/page.html"}}},
            "no data unit": {"files": None},
            "no primary": {"files": {"annotation_data": {"path": units[0]["files"]["annotation_data"]["path"]}}},
        }  # fmt: skip
        project, ids = make_project(platform, [*units, *bad.values()])
        report = tmp_path / "r.jsonl"
        result = run_to_task(
            {**FILE_PARAMS, "project": project},
            platform=config_for(platform),
            report=report,
            allowed_hosts=[f"127.0.0.1:{other.rsplit(':', 1)[1]}"],  # the file server beside the platform
            max_json_bytes=4096,
            num_actors=1,
            progress_bar=False,
        )

    good_ids, bad_ids = ids[: len(units)], dict(zip(bad, ids[len(units) :], strict=True))
    assert result.status is RunStatus.SUCCEEDED
    assert (result.success_count, result.failed_count) == (len(units), len(bad))
    errors = {f.task_id: f.error for f in result.failures}
    expected_words = {
        "missing target file": "no file under specification 'annotation_data'",
        "404 url": "HTTP 404",
        "invalid json": "Invalid JSON",
        "schema violation": "coordinates.width",
        "oversized": "4,096-byte limit",
        "html page": "content type text/html",
        "no data unit": "no data unit",
        "no primary": "no primary file",
    }
    for case, tid in bad_ids.items():
        assert expected_words[case] in errors[tid], f"{case}: {errors[tid]}"
        assert "signature=" not in errors[tid] and "expires=" not in errors[tid]
        assert not platform.store.get_task(tid)["data"], f"{case}: task was written"
    for unit, tid in zip(units, good_ids, strict=True):
        assert platform.store.get_task(tid)["data"] == unit["expected"]
    stages = {rec["task_id"]: rec["stage"] for rec in read_report(report).values()}
    assert stages[bad_ids["schema violation"]] == "validate"
    assert stages[bad_ids["missing target file"]] == "locate"


class RaisingHook(ToTask):
    """A plugin whose hook raises for every other task, and converts the rest."""

    def convert_data_from_file(
        self, primary_file_url, primary_file_name, data_file_url, data_file_name, task_data=None
    ):
        if task_data["id"] % 2:
            raise ValueError("this plugin cannot read odd tasks")
        data = super().convert_data_from_file(
            primary_file_url, primary_file_name, data_file_url, data_file_name, task_data
        )
        data["source"] = primary_file_name
        return data


def test_a_plugin_hook_that_raises_fails_its_task_only(platform):
    units = [good_unit(platform, i, "hook") for i in range(6)]
    project, ids = make_project(platform, units)
    result = run_to_task(
        {**FILE_PARAMS, "project": project}, platform=config_for(platform), action_cls=RaisingHook,
        num_actors=1, progress_bar=False,
    )  # fmt: skip
    odd = [t for t in ids if t % 2]
    assert result.failed_count == len(odd) and result.success_count == len(ids) - len(odd)
    for f in result.failures:
        assert f.error == "convert_data_from_file raised ValueError: this plugin cannot read odd tasks"
    for tid, unit in zip(ids, units, strict=True):
        data = platform.store.get_task(tid)["data"]
        if tid % 2:
            assert not data
        else:
            assert data == {**unit["expected"], "source": "img.png"}


def test_every_task_failed_means_failed(platform):
    unit = {"files": {"image_1": {"path": "x.png"}}}
    project, _ = make_project(platform, [unit, unit])
    result = run_to_task(
        {**FILE_PARAMS, "project": project}, platform=config_for(platform), num_actors=1, progress_bar=False
    )
    assert result.status is RunStatus.FAILED
    assert (result.success_count, result.failed_count) == (0, 2)
    assert "0 succeeded, 2 failed" in result.message


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no project", "Project not found"),
        ("no collection", "Project has no data collection"),
        ("bad spec", "Target specification not found"),
        ("no tasks", "No tasks found matching filters"),
    ],
)
def test_critical_errors_stop_before_writing(platform, case, message):
    store = platform.store
    if case == "no collection":
        project, ids = make_project(platform, [], with_collection=False)
    else:
        project, ids = make_project(platform, [good_unit(platform, 0, "crit")])
    params = {**FILE_PARAMS, "project": project}
    if case == "no project":
        params["project"] = 987654
    elif case == "bad spec":
        params["target_specification_name"] = "labels_v2"
    elif case == "no tasks":
        params["task_filters"] = {"status": "archived"}
    job = store.create_job(action="to_task") if hasattr(store, "create_job") else None
    job_id = job if isinstance(job, int) else None
    with pytest.raises(ToTaskError) as info:
        run_to_task(params, platform=config_for(platform), job_id=job_id, progress_bar=False)
    assert str(info.value).startswith(message)
    assert platform.token not in str(info.value)
    assert info.value.result is not None and info.value.result.status is RunStatus.FAILED
    assert store.history_counts(task_ids=ids) == {}
    if job_id is not None:
        record = store.get_job(job_id)
        assert record["status"] == "FAILED"
        assert message in json.dumps(record["result"])
