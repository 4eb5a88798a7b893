"""Job parameters: every violation names the field and what to do; files load as YAML or JSON."""

from __future__ import annotations

import json

import pytest

from totask_ray.params import Method, ParamsError, ToTaskParams
from totask_ray.result import RunStatus, ToTaskResult

BASE = {"name": "File_Job", "project": 1, "method": "file", "target_specification_name": "annotation_data"}


def test_defaults_follow_the_synapse_action():
    p = ToTaskParams.parse(BASE)
    assert p.method is Method.FILE
    assert p.task_filters == {}
    assert p.pre_processor_params == {}
    assert p.schema == "dm_schema_v1"
    assert p.to_synapse()["target_specification_name"] == "annotation_data"
    assert "schema" in p.to_synapse()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"name": "has space"}, "name", "whitespace"),
        ({"name": "   "}, "name", "blank"),
        ({"name": None}, "name", "valid string"),
        ({"method": "magic"}, "method", "'file' or 'inference'"),
        ({"target_specification_name": None}, "target_specification_name", "required when method is 'file'"),
        (
            {"method": "inference", "target_specification_name": None},
            "pre_processor",
            "required when method is 'inference'",
        ),
        ({"batch_size": 0}, "batch_size", "at least 1"),
        ({"batch_size": 1.5}, "batch_size", "whole number"),
        ({"project": "abc"}, "project", "numeric id"),
        ({"project": True}, "project", "whole number"),
        ({"project": -3}, "project", "greater than 0"),
        ({"task_filters": ["status"]}, "task_filters", "mapping"),
        ({"task_filters": {"status": {"a": 1}}}, "task_filters", "not a mapping"),
        ({"schema": "xml"}, "schema", "dm_schema_v1"),
        ({"unknown_key": 1}, "unknown_key", "not a known parameter"),
        ({"pre_processor_params": "x"}, "pre_processor_params", "mapping"),
        ({"on_success": {}}, "on_success", "at least one"),
    ],
)
def test_each_violation_names_its_field(change, field, words):
    with pytest.raises(ParamsError) as info:
        ToTaskParams.parse({**BASE, **change})
    fields = [f for f, _ in info.value.problems]
    assert any(f.startswith(field) for f in fields), info.value.problems
    assert words in str(info.value)


def test_missing_required_fields_are_all_reported():
    with pytest.raises(ParamsError) as info:
        ToTaskParams.parse({"method": "file"})
    fields = {f for f, _ in info.value.problems}
    assert {"name", "project"} <= fields


def test_not_a_mapping():
    with pytest.raises(ParamsError, match="mapping"):
        ToTaskParams.parse(["name"])


def test_secret_looking_values_are_not_echoed():
    with pytest.raises(ParamsError) as info:
        ToTaskParams.parse({**BASE, "name": "tok en-SECRET123"})
    assert "SECRET123" not in str(info.value)


def test_load_yaml_and_json(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text(
        "name: J\nproject: 3\ntarget_specification_name: ann\ntask_filters:\n  status: pending\n  assignee: null\n"
    )
    p = ToTaskParams.from_file(y)
    assert p.project == 3 and p.task_filters == {"status": "pending", "assignee": None}
    j = tmp_path / "job.json"
    j.write_text(json.dumps({**BASE, "schema": "any"}))
    assert ToTaskParams.from_file(j).schema == "any"


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("missing.yaml", None, "does not exist"),
        ("bad.yaml", "name: [unclosed", "not valid YAML"),
        ("bad.json", "{", "not valid JSON"),
        ("list.yaml", "- a\n- b\n", "mapping"),
    ],
)
def test_bad_files(tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ParamsError, match=words):
        ToTaskParams.from_file(path)


def test_result_reads_like_the_synapse_dict():
    r = ToTaskResult(status=RunStatus.SUCCEEDED, message="ok", total_tasks=3, success_count=3)
    assert r["status"] == "SUCCEEDED"
    assert r.metrics.model_dump() == {"total": 0, "success": 0, "failed": 0, "stand_by": 0, "empty": 0}
