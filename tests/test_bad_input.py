"""Bad input, table-driven: every case names the clear message it must produce.

- Parameters fail before anything is written: no job record, no platform write, no Ray.
- Annotation files, file URLs and platform answers are per-task cases: they share ONE Ray run over
  one project that also holds good tasks, and each bad task fails alone, with its message and
  stage, while every good task is written.
- Model output is checked with `validate_output` directly, and through the real
  `InferenceAnnotator` (real platform, real downloads and decoding) whose Serve handle is replaced
  by a stub returning the bad output: a Serve deployment would cost more than this file's budget.
- Platform answers the embedded server cannot produce (malformed pagination, a task that is not an
  object, a file whose url is null) are injected with `httpx.MockTransport` into the real clients;
  the rest (a task without a data unit, files with an empty url) are made for real in the store.

No message may contain the token, a signed URL's query (signature/expires) or a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import config_for, file_server, good_unit, make_project, png, read_report, write_media

from totask_ray import ToTaskError, run_to_task
from totask_ray.params import ParamsError, ToTaskParams
from totask_ray.platform.errors import PlatformResponseError
from totask_ray.platform.synapse.client import AsyncSynapseClient, SynapseClient
from totask_ray.result import RunStatus
from totask_ray.serving.interface import PreProcessorOutputError
from totask_ray.serving.validation import validate_output

FILE_PARAMS = {"name": "Bad_Input_Job", "method": "file", "target_specification_name": "annotation_data"}
MAX_JSON_BYTES = 4096  # the cap for the per-task run; the "oversized" file is 10x over it
SIG = "c0ffee5167da7a5ec2e7"  # a fake signed-URL signature: must never reach a message


def assert_clean(message: str, *secrets: str) -> None:
    """One line, no stack trace, no signed-URL query, none of `secrets`."""
    assert "\n" not in message and "Traceback" not in message, message
    assert "signature=" not in message and "expires=" not in message, message
    assert SIG not in message, message
    for secret in secrets:
        assert secret not in message, message


# -- 1. parameters -------------------------------------------------------------------------------

# (case, change to FILE_PARAMS + project; None as a value removes the key, field named, words)
PARAM_CASES = [
    ("whitespace in name", {"name": "File Job"}, "name", "must not contain whitespace"),
    ("tab in name", {"name": "File\tJob"}, "name", "must not contain whitespace"),
    ("blank name", {"name": ""}, "name", "must not be blank"),
    ("unknown method", {"method": "magic"}, "method", "'file' or 'inference'"),
    ("method in capitals", {"method": "FILE"}, "method", "'file' or 'inference'"),
    ("missing target_specification_name", {"target_specification_name": None},
     "target_specification_name", "required when method is 'file'"),
    ("blank target_specification_name", {"target_specification_name": "  "},
     "target_specification_name", "required when method is 'file'"),
    ("missing pre_processor", {"method": "inference", "target_specification_name": None},
     "pre_processor", "required when method is 'inference'"),
    ("batch_size 0", {"batch_size": 0}, "batch_size", "greater than or equal to 1"),
    ("batch_size too big", {"batch_size": 10_001}, "batch_size", "less than or equal to 10000"),
    ("batch_size a fraction", {"batch_size": 2.5}, "batch_size", "whole number"),
    ("batch_size a word", {"batch_size": "ten"}, "batch_size", "valid integer"),
    ("unknown key", {"target_spec": "annotation_data"}, "target_spec",
     "not a known parameter; known parameters are: agent, batch_size"),
    ("unknown key in on_success", {"on_success": {"status": "done", "colour": "red"}}, "on_success.colour",
     "not a known field of on_success; known fields are: assignee, status, submit"),
    ("project a word", {"project": "abc"}, "project", "valid integer"),
    ("project a bool", {"project": True}, "project", "whole number"),
    ("project negative", {"project": -3}, "project", "greater than 0"),
    ("missing project", {"project": None}, "project", "is required"),
    ("name a number", {"name": 123}, "name", "valid string"),
    ("task_filters a list", {"task_filters": ["pending"]}, "task_filters", "valid dictionary"),
    ("task_filters nested mapping", {"task_filters": {"status": {"in": "x"}}}, "task_filters",
     "must be a value or a list of values, not a mapping"),
    ("pre_processor_params a string", {"pre_processor_params": "x"}, "pre_processor_params", "valid dictionary"),
    ("pre_processor a word", {"method": "inference", "pre_processor": "faces"}, "pre_processor", "valid integer"),
    ("schema unknown", {"schema": "xml"}, "schema", "'dm_schema_v1' or 'any'"),
    ("existing_data unknown", {"existing_data": "keep"}, "existing_data", "'overwrite' or 'skip'"),
    ("on_success empty", {"on_success": {}}, "on_success", "set at least one of status, assignee or submit"),
    ("on_success a string", {"on_success": "yes"}, "on_success", "valid dictionary"),
]  # fmt: skip


def _jobs(store) -> int:
    return store.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


@pytest.fixture(scope="module")
def param_project(platform):
    return make_project(platform, [good_unit(platform, 0, "badparams")])


@pytest.mark.parametrize(("case", "change", "field", "words"), PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_parameters_fail_before_anything_is_written(platform, param_project, case, change, field, words):
    project, ids = param_project
    params = {**FILE_PARAMS, "project": project, **change}
    params = {k: v for k, v in params.items() if v is not None}
    jobs_before = _jobs(platform.store)

    with pytest.raises(ParamsError) as info:
        run_to_task(params, platform=config_for(platform), create_job=True, progress_bar=False)

    problems = dict(info.value.problems)
    assert field in problems, f"{case}: {info.value.problems}"
    assert words in problems[field], f"{case}: {problems[field]}"
    assert str(info.value).startswith("Invalid job parameters")
    assert "Traceback" not in str(info.value) and platform.token not in str(info.value)
    assert _jobs(platform.store) == jobs_before, "a job record was created for bad parameters"
    assert platform.store.history_counts(task_ids=ids) == {}
    assert not platform.store.get_task(ids[0])["data"]


def test_parameter_values_are_never_echoed(platform):
    # A token pasted into the wrong field must not be repeated back in the error.
    token = platform.token
    with pytest.raises(ParamsError) as info:
        ToTaskParams.parse({**FILE_PARAMS, "project": token, "name": f"my {token}", "batch_size": token,
                            "task_filters": {"status": {"token": token}}, "on_success": {"status": 1, "x": token}})  # fmt: skip
    assert {"name", "project", "batch_size", "task_filters", "on_success.x"} <= dict(
        info.value.problems
    ).keys()
    assert token not in str(info.value)


@pytest.mark.parametrize(
    ("data", "words"),
    [(["name"], "must be a mapping"), ({}, "name: is required"), (None, "must be a mapping")],
)
def test_not_a_mapping_or_nothing(data, words):
    with pytest.raises(ParamsError) as info:
        run_to_task(data, platform=None)
    assert words in str(info.value)


# -- 2, 3, 4. per-task cases: annotation files, URLs, platform answers, in one run -----------------


class RecordingRoutes(dict):
    """Routes for `helpers.file_server` that remember every path requested."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.requested: list[str] = []

    def get(self, key: Any, default: Any = None) -> Any:
        self.requested.append(key)
        return super().get(key, default)


def closed_port() -> int:
    """A loopback port that nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def box(x: Any = 1, y: Any = 1, w: Any = 5, h: Any = 5, oid: str = "a") -> dict[str, Any]:
    return {
        "id": oid,
        "class_id": 1,
        "type": "bbox",
        "coordinates": {"x": x, "y": y, "width": w, "height": h},
    }


@dataclass
class Case:
    files: dict[str, Any] | None  # the data unit's files; None: a task without a data unit
    words: str  # what the task's error must say
    stage: str  # where processing stopped
    task_id: int = 0  # set once the project exists


NEVER = ("/via-localhost.json", "/via-127-0-0-2.json", "/via-mapped.json", "/redirected-to-localhost.json")


@contextmanager
def bad_input_project(
    platform, prefix: str
) -> Iterator[tuple[int, list[int], dict[str, Case], list, RecordingRoutes, str]]:
    """A project of good tasks followed by one task per bad-input case (files, URLs, platform).

    Yields (project, good ids, {case: Case with .task_id}, good units, the file server's routes, the
    allow-list entry for the file server and the closed port beside it: `127.0.0.1`, every port) while
    the file server (the second host) runs. Shared with tests/test_security.py's CLI run.
    """
    good_json = json.dumps({"objects": [box(oid="via")]}).encode()
    routes = RecordingRoutes(
        {
            "/page.html": (200, "text/html", b"<html>login</html>", {}),
            "/picture.json": (200, "image/png", b"\x89PNG\r\n\x1a\n", {}),
            "/redirect-to-metadata": (302, "text/plain", b"", {"Location": "http://169.254.169.254/latest/meta-data/"}),
            "/redirect-to-file": (302, "text/plain", b"", {"Location": "file:///etc/passwd"}),
            "/loop": (302, "text/plain", b"", {"Location": "/loop"}),
            "/moved-nowhere": (302, "application/json", b'{"objects": []}', {}),
            "/error.json": (500, "application/json", b'{"detail": "boom"}', {}),
            **{path: (200, "application/json", good_json, {}) for path in NEVER},
        }
    )  # fmt: skip
    with file_server(routes) as other:
        port = other.rsplit(":", 1)[1]
        routes["/redirect-to-localhost"] = (
            302,
            "text/plain",
            b"",
            {"Location": f"http://localhost:{port}{NEVER[3]}"},
        )
        img = write_media(platform, f"{prefix}/img.png", b"\x89PNG\r\n\x1a\n")

        def media(name: str, content: bytes | str | Any) -> dict[str, Any]:
            return {
                "image_1": {"path": img},
                "annotation_data": {"path": write_media(platform, f"{prefix}/{name}", content)},
            }

        def url(u: str) -> dict[str, Any]:
            return {"image_1": {"path": img}, "annotation_data": {"url": u}}

        closed = closed_port()
        big = json.dumps({"objects": [], "padding": "x" * (10 * MAX_JSON_BYTES)})
        nan_file = '{"objects": [{"id": "a", "class_id": 1, "type": "bbox", "coordinates": {"x": NaN, "y": 1, "width": 5, "height": 5}}]}'
        cases = {
            # annotation files (stored on the platform, fetched through signed media URLs)
            "invalid JSON": Case(media("invalid.json", "{oops"), "Invalid JSON format in annotation file", "convert"),
            "empty file": Case(media("empty.json", b""), "Invalid JSON format in annotation file: Expecting value", "convert"),
            "a JSON array": Case(media("array.json", "[1, 2]"), "task data must be a JSON object, got a JSON array", "validate"),
            "an empty array": Case(media("empty_array.json", "[]"), "the annotation file holds no data", "convert"),
            "an empty object": Case(media("empty_object.json", "{}"), "the annotation file holds no data", "convert"),
            "no objects list": Case(media("boxes.json", {"boxes": []}), "no 'objects' list (dm_schema_v1)", "validate"),
            "unknown object type": Case(media("circle.json", {"objects": [{**box(), "type": "circle"}]}),
                                        "objects[0] (id 'a').type: Input should be", "validate"),
            "unknown object field": Case(media("colour.json", {"objects": [{**box(), "colour": "red"}]}),
                                         "objects[0] (id 'a').colour: is not a known field", "validate"),
            "duplicate ids": Case(media("dup.json", {"objects": [box(), box()]}), "ids must be unique", "validate"),
            "NaN coordinate": Case(media("nan.json", nan_file), "NaN is not valid JSON", "convert"),
            "overflowing number": Case(media("inf.json", '{"objects": [{"id": "a", "class_id": 1, "type": "bbox", '
                                                          '"coordinates": {"x": 1e999, "y": 1, "width": 5, "height": 5}}]}'),
                                       "data.objects[0].coordinates.x is inf; numbers must be finite", "validate"),
            "negative coordinate": Case(media("neg.json", {"objects": [box(x=-5)]}),
                                        "objects[0] (id 'a'): coordinates.x: Input should be greater than or equal to 0", "validate"),
            "negative width": Case(media("negw.json", {"objects": [box(w=-4)]}), "coordinates.width: Input should be greater than 0", "validate"),
            "confidence out of range": Case(media("conf.json", {"objects": [{**box(), "properties": {"confidence": 2}}]}),
                                            "confidence must be a finite number between 0 and 1", "validate"),
            "10x over the size cap": Case(media("big.json", big), f"over the {MAX_JSON_BYTES:,}-byte limit", "convert"),
            "invalid UTF-8": Case(media("latin1.json", '{"objects": [], "label": "caf\xe9"}'.encode("latin-1")),
                                  "annotation file is not valid UTF-8 (bad byte at position 29)", "convert"),
            "UTF-16": Case(media("utf16.json", '{"objects": []}'.encode("utf-16")), "is not valid UTF-8", "convert"),
            "nested too deeply": Case(media("deep.json", "[" * 2000 + "]" * 2000), "nested too deeply", "convert"),
            "HTML content type": Case(url(f"{other}/page.html"), "has content type text/html, expected application/json", "convert"),
            "image content type": Case(url(f"{other}/picture.json"), "has content type image/png", "convert"),
            # URLs
            "file:// URL": Case(url("file:///etc/passwd"), "only http and https file URLs are allowed, not file://", "convert"),
            "ftp:// URL": Case(url(f"ftp://127.0.0.1:{port}/ann.json"), "only http and https file URLs are allowed, not ftp://", "convert"),
            "URL without host": Case(url("http:///ann.json"), "the file URL has no host", "convert"),
            "malformed URL": Case(url("http://[::1/ann.json"), "the file URL is malformed", "convert"),
            "localhost (loopback, not the platform's host string)": Case(
                url(f"http://localhost:{port}{NEVER[0]}?expires=1&signature={SIG}"),
                "refusing to fetch from localhost: it resolves to a private, loopback or link-local address", "convert"),
            "127.0.0.2 (loopback)": Case(url(f"http://127.0.0.2:{port}{NEVER[1]}"), "refusing to fetch from 127.0.0.2", "convert"),
            "IPv4-mapped loopback": Case(url(f"http://[::ffff:127.0.0.1]:{port}{NEVER[2]}"), "refusing to fetch from ::ffff:127.0.0.1", "convert"),
            "link-local metadata address": Case(url("http://169.254.169.254/latest/meta-data/"),
                                                "refusing to fetch from 169.254.169.254", "convert"),
            "redirect to link-local": Case(url(f"{other}/redirect-to-metadata"), "refusing to fetch from 169.254.169.254", "convert"),
            "redirect to localhost": Case(url(f"{other}/redirect-to-localhost"), "refusing to fetch from localhost", "convert"),
            "redirect to file://": Case(url(f"{other}/redirect-to-file"), "not file://", "convert"),
            "redirect loop": Case(url(f"{other}/loop"), "redirected more than 5 times", "convert"),
            "redirect without location": Case(url(f"{other}/moved-nowhere"), "HTTP 302 without a redirect location", "convert"),
            "unreachable host": Case(url(f"http://127.0.0.1:{closed}/ann.json"),
                                     f"Failed to download from http://127.0.0.1:{closed}/ann.json: could not connect", "convert"),
            "404 with a signed query": Case(url(f"{other}/gone.json?expires=99&signature={SIG}"),
                                            f"Failed to download from {other}/gone.json: HTTP 404", "convert"),
            "server error": Case(url(f"{other}/error.json"), "HTTP 500", "convert"),
            # platform answers, made for real in the store
            "task without a data unit": Case(None, "task has no data unit", "fetch"),
            "annotation file without a url": Case({"image_1": {"path": img}, "annotation_data": {"url": ""}},
                                                  "file 'annotation_data' has no URL", "locate"),
            "primary file without a url": Case({"image_1": {"url": ""}, "annotation_data": {"url": f"{other}/unused.json"}},
                                               "the data unit has no primary file with a URL", "locate"),
            "no annotation file": Case({"image_1": {"path": img}}, "no file under specification 'annotation_data'", "locate"),
        }  # fmt: skip
        goods = [good_unit(platform, i, prefix) for i in range(6)]
        # good tasks first and last, so a bad task between them cannot hide a batch-level failure
        units = [*goods[:3], *({"files": c.files} for c in cases.values()), *goods[3:]]
        project, ids = make_project(platform, units)
        bad_ids = ids[3 : 3 + len(cases)]
        for case, tid in zip(cases.values(), bad_ids, strict=True):
            case.task_id = tid
        yield project, [*ids[:3], *ids[3 + len(cases) :]], cases, goods, routes, "127.0.0.1"


@pytest.mark.slow
def test_per_task_bad_input_fails_only_its_task(platform, ray_cluster, tmp_path):
    report = tmp_path / "report.jsonl"
    job_id = platform.store.create_job("to_task")
    with bad_input_project(platform, "badinput") as (project, good_ids, cases, goods, routes, files):
        result = run_to_task(
            {**FILE_PARAMS, "project": project},
            platform=config_for(platform),
            report=report,
            allowed_hosts=[files],  # the second host: trusted on its port, as a user would say
            job_id=job_id,
            max_json_bytes=MAX_JSON_BYTES,
            num_actors=1,
            progress_bar=False,
        )
    assert len(cases) >= 30
    store = platform.store
    assert result.status is RunStatus.SUCCEEDED
    assert (result.success_count, result.failed_count) == (len(goods), len(cases)), result.message
    errors = {f.task_id: f.error for f in result.failures}
    outcomes = read_report(report)
    wrong = {}
    for name, case in cases.items():
        tid = case.task_id
        error, stage = errors.get(tid, "(no failure)"), outcomes[tid]["stage"]
        if case.words not in error or stage != case.stage:
            wrong[name] = (stage, error)
        assert_clean(error, platform.token)
        assert outcomes[tid]["status"] == "failed" and outcomes[tid]["error"] == error
        assert not store.get_task(tid)["data"], f"{name}: the task was written"
    assert wrong == {}, json.dumps(wrong, indent=1)
    # refused URLs were refused before any request reached the server
    assert not set(NEVER) & set(routes.requested), routes.requested
    assert store.history_counts(task_ids=[c.task_id for c in cases.values()]) == {}
    for tid, unit in zip(good_ids, goods, strict=True):
        assert store.get_task(tid)["data"] == unit["expected"]
    assert set(store.history_counts(task_ids=good_ids).values()) == {1}
    # the job record holds the same messages, and nothing secret
    record = json.dumps(store.get_job(job_id))
    assert store.get_job(job_id)["status"] == "SUCCEEDED"
    assert cases["link-local metadata address"].words in record
    for text in (record, report.read_text(), result.message):
        assert platform.token not in text and SIG not in text
        assert "signature=" not in text and "Traceback" not in text


# -- malformed platform answers the embedded server cannot produce (MockTransport) -----------------

LISTING_CASES = [
    ("results not a list", {"count": 1, "next": None, "results": "1,2"}, "a task listing must be an object with a 'results' list"),
    ("a bare JSON array", [{"id": 1}], "a task listing must be an object with a 'results' list"),
    ("count missing", {"next": None, "results": [{"id": 1}]}, "a task listing must carry a non-negative 'count'"),
    ("count negative", {"count": -1, "next": None, "results": []}, "a task listing must carry a non-negative 'count'"),
    ("id a string", {"count": 1, "next": None, "results": [{"id": "7"}]}, "every listed task must carry an integer 'id'"),
    ("id a bool", {"count": 1, "next": None, "results": [{"id": True}]}, "every listed task must carry an integer 'id'"),
    ("item not an object", {"count": 1, "next": None, "results": [7]}, "every listed task must carry an integer 'id'"),
    ("next not a URL", {"count": 2, "next": 2, "results": [{"id": 1}]}, "'next' must be a URL or null"),
    ("next on another host", {"count": 2, "next": "http://evil.example/sdk/tasks/?page=2", "results": [{"id": 1}]},
     "the platform returned a link to another host (http://evil.example/sdk/tasks/); refusing to follow it"),
    ("body not JSON", b"<html>maintenance</html>", "GET sdk/tasks/ answered with a body that is not JSON"),
]  # fmt: skip


def _answer(body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.Response(200, content=body, headers={"content-type": "text/html"})
    return httpx.Response(200, json=body)


@pytest.mark.parametrize(("case", "body", "words"), LISTING_CASES, ids=[c[0] for c in LISTING_CASES])
def test_malformed_pagination_is_a_clear_response_error(platform, case, body, words):
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.host))
        return _answer(body)

    # a fake transport: the embedded server never answers these shapes
    client = SynapseClient(config_for(platform, retries=0), transport=httpx.MockTransport(handler))
    with client, pytest.raises(PlatformResponseError) as info:
        list(client.iter_task_ids(1, {}))
    assert words in str(info.value)
    assert_clean(str(info.value), platform.token)
    assert "evil.example" not in seen  # the token was not sent to the other host


def test_malformed_pagination_fails_the_run_before_anything_is_written(platform, monkeypatch):
    """The real driver over the real platform, with only the task listing replaced by a bad shape."""
    import totask_ray.run.driver as driver

    project, ids = make_project(platform, [good_unit(platform, i, "badpage") for i in range(2)])
    real = httpx.Client(timeout=10)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/sdk/tasks"):
            return httpx.Response(200, json={"count": "two", "results": [{"id": ids[0]}]})
        answer = real.send(
            httpx.Request(request.method, request.url, headers=request.headers, content=request.content)
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    monkeypatch.setattr(
        driver, "connect", lambda config: SynapseClient(config, transport=httpx.MockTransport(handler))
    )
    try:
        with pytest.raises(ToTaskError) as info:
            run_to_task(
                {**FILE_PARAMS, "project": project}, platform=config_for(platform), progress_bar=False
            )
    finally:
        real.close()
    assert str(info.value) == (
        "GET sdk/tasks/ answered with an unexpected shape: a task listing must carry a non-negative 'count'"
    )
    assert platform.store.history_counts(task_ids=ids) == {}


def _unit(files: Any) -> dict[str, Any]:
    return {"id": 5, "files": files}


# task id -> (the platform's answer for GET tasks/<id>/, words of the task's error, stage)
TASK_ANSWERS: dict[int, tuple[Any, str, str]] = {
    1: ([{"id": 1}], "could not read the task: GET tasks/1/ answered with an unexpected shape", "fetch"),
    2: ({"id": 2, "data": {}, "data_unit": "du-7"}, "GET tasks/2/ answered with an unexpected shape: data_unit", "fetch"),
    3: ({"data": {}, "data_unit": _unit({})}, "GET tasks/3/ answered with an unexpected shape: id: Field required", "fetch"),
    4: ({"id": 4, "data_unit": _unit("image.png")}, "files must be an object keyed by specification name", "fetch"),
    5: ({"id": 5, "data_unit": _unit([{"url": "http://x/y"}])}, "a file in the list has no specification name", "fetch"),
    6: ({"id": 6, "data_unit": _unit({"image_1": {"url": "IMG", "is_primary": True}, "annotation_data": {"url": None}})},
        "file 'annotation_data' has no URL", "locate"),
    7: ({"id": 7, "data_unit": _unit({"image_1": {"url": None, "is_primary": True}, "annotation_data": {"url": "ANN"}})},
        "the data unit has no primary file with a URL", "locate"),
    8: ({"id": 8, "data": {}, "data_unit": None}, "task has no data unit", "fetch"),
    9: (b"<html>502 Bad Gateway</html>", "GET tasks/9/ answered with a body that is not JSON", "fetch"),
    10: ({"id": 10, "data_unit": _unit({"image_1": {"url": "IMG", "is_primary": True}, "annotation_data": {"url": "ANN"}})}, "", ""),
}  # fmt: skip


def test_malformed_task_answers_fail_only_their_task(platform, monkeypatch):
    """The real FileAnnotator, its platform client on a fake transport (the embedded server cannot
    answer these shapes); downloads are real, from a loopback file server."""
    from totask_ray.methods.file import FileAnnotator
    from totask_ray.pipeline.spec import RunOptions, RunSpec

    monkeypatch.setattr("totask_ray.pipeline.annotator._node_id", lambda: "")  # no Ray in this test
    written: dict[int, Any] = {}
    ann = {"objects": [box()]}

    with file_server({"/ann.json": (200, "application/json", json.dumps(ann).encode(), {})}) as other:

        def handler(request: httpx.Request) -> httpx.Response:
            parts = request.url.path.strip("/").split("/")
            if request.method == "PUT" and parts[-1] == "annotate_task_data":
                written[int(parts[1])] = json.loads(request.content)["data"]
                return httpx.Response(200, json={"id": int(parts[1])})
            body = TASK_ANSWERS[int(parts[1])][0]
            if isinstance(body, bytes):
                return _answer(body)
            text = json.dumps(body).replace("IMG", f"{other}/img.png").replace("ANN", f"{other}/ann.json")
            return _answer(json.loads(text))

        # the file server is on the platform's host (loopback): the platform's URL policy allows it
        spec = RunSpec(
            params=ToTaskParams.parse({**FILE_PARAMS, "project": 1}),
            options=RunOptions(allowed_hosts=[f"127.0.0.1:{other.rsplit(':', 1)[1]}"]),
            platform=config_for(platform, retries=0),
        )

        async def run() -> list:
            annotator = FileAnnotator(spec)
            await annotator._ready()
            await annotator._client.aclose()
            annotator._client = AsyncSynapseClient(spec.platform, transport=httpx.MockTransport(handler))
            try:
                return await annotator.run_batch(list(TASK_ANSWERS))
            finally:
                await annotator._client.aclose()
                await annotator._downloader.aclose()

        outcomes = {o.task_id: o for o in asyncio.run(run())}

    assert written == {10: ann}
    assert outcomes[10].status == "success" and outcomes[10].written
    for tid, (_, words, stage) in TASK_ANSWERS.items():
        if tid == 10:
            continue
        o = outcomes[tid]
        assert (o.status, o.stage) == ("failed", stage), (tid, o)
        assert words in o.error, (tid, o.error)
        assert_clean(o.error, platform.token)


# -- 5. model output -------------------------------------------------------------------------------

IMAGE = np.zeros((100, 200, 3), np.uint8)  # 200 wide, 100 high


def det(**changes: Any) -> dict[str, Any]:
    return {"label": "face", "class_id": 0, "score": 0.9, "bbox": [10, 10, 20, 20], **changes}


NAN = float("nan")
OUTPUT_CASES = [
    ("not a list", {"detections": []}, "expected a list with one list of detections per image, got dict"),
    ("nothing", None, "expected a list with one list of detections per image, got NoneType"),
    ("a list per image missing", [], "expected one list of detections per image: 1 images, 0 lists"),
    ("an image's entry not a list", [det()], "image 0: expected a list of detections, got dict"),
    ("a detection not a mapping", [[[10, 10, 20, 20]]], "image 0, detection 0: expected a Detection or a mapping, got list"),
    ("box outside the image", [[det(bbox=[190, 10, 30, 20])]],
     "image 0, detection 0, field 'bbox': [x, y, width, height] = [190.0, 10.0, 30.0, 20.0] extends outside the 200x100 image"),
    ("box above the image", [[det(), det(bbox=[10, -8, 20, 20])]], "image 0, detection 1, field 'bbox'"),
    ("NaN score", [[det(score=NAN)]], "image 0, detection 0, field 'score': Input should be a finite number"),
    ("score over 1", [[det(score=1.5)]], "field 'score': Input should be less than or equal to 1"),
    ("NaN coordinate", [[det(bbox=[NAN, 10, 20, 20])]], "field 'bbox.0': Input should be a finite number"),
    ("zero width", [[det(bbox=[10, 10, 0, 20])]], "width and height must be > 0"),
    ("no label", [[{k: v for k, v in det().items() if k != "label"}]], "field 'label': Field required"),
    ("negative class_id", [[det(class_id=-1)]], "field 'class_id': Input should be greater than or equal to 0"),
    ("unknown field", [[det(colour="red")]], "field 'colour': Extra inputs are not permitted"),
    ("polygon outside", [[det(polygon=[[0, 0], [250, 0], [0, 50]])]], "field 'polygon.1': point [250.00, 0.00] is outside"),
    ("polygon of two points", [[det(polygon=[[0, 0], [5, 5]])]], "a polygon needs at least 3 points, got 2"),
    ("label not the spec's", [[det(label="cat")]], "field 'label': 'cat' does not match class_id 0 ('face')"),
    ("class_id not the spec's", [[det(class_id=7, label="x")]], "field 'class_id': 7 is not one of the spec's labels [0]"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "output", "words"), OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_bad_model_output_is_named(case, output, words):
    with pytest.raises(PreProcessorOutputError) as info:
        validate_output([IMAGE], output, labels={0: "face"})
    assert words in str(info.value)
    assert_clean(str(info.value))


class _Stream:
    """What `handle.options(stream=True).predict_timed.remote(...)` returns: the replica's "started"
    mark, then the answer; cancellable."""

    def __init__(self, value: Any):
        from totask_ray.serving.batch_entry import STARTED

        self.items = iter([STARTED, value])

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self.items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        pass


class StubHandle:
    """Stands in for the Serve handle: answers from the image's first pixel (its "colour"), decoding
    the file's bytes as the replica does."""

    def __init__(self, by_colour: dict[int, Any] | None = None, whole: Any = None):
        self.calls = 0
        self.sent: list[Any] = []

        def remote(images: list[Any], params: dict[str, Any]) -> _Stream:
            from totask_ray.net.images import decode_image

            self.calls += 1
            self.sent.extend(images)
            if by_colour is None:
                return _Stream(whole)
            return _Stream([by_colour[int(decode_image(img)[0, 0, 0])] for img in images])

        self.predict_timed = type("Method", (), {"remote": staticmethod(remote)})()

    def options(self, **_: Any) -> StubHandle:  # a real handle's options() returns a handle
        return self


def _png(colour: int) -> bytes:
    return png(np.full((60, 80, 3), colour, np.uint8))


# colour -> (the model's detections for that image, words of the task's error; "" = written)
MODEL_ANSWERS = {
    10: ([det(bbox=[5, 5, 20, 20])], ""),
    20: (
        [det(bbox=[70, 5, 20, 20])],
        "the pre-processor's output is invalid: image 0, detection 0, field 'bbox'",
    ),
    30: ([det(score=NAN)], "the pre-processor's output is invalid: image 0, detection 0, field 'score'"),
    40: (
        {"boxes": []},
        "the pre-processor's output is invalid: image 0: expected a list of detections, got dict",
    ),
    50: ([det(), "face"], "image 0, detection 1: expected a Detection or a mapping, got str"),
    # nothing seen, or nothing above the threshold: an empty object list is written (the SDK's rule)
    60: ([], "EMPTY"),
    70: ([det(bbox=[5, 5, 20, 20], score=0.2)], "EMPTY"),  # under the threshold
}


def test_bad_model_output_fails_only_its_task_through_the_inference_worker(platform, monkeypatch):
    import ray.serve

    from totask_ray.methods.inference import InferenceAnnotator
    from totask_ray.pipeline.spec import RunOptions, RunSpec

    monkeypatch.setattr("totask_ray.pipeline.annotator._node_id", lambda: "")  # no Ray in this test
    store = platform.store
    dc = store.create_data_collection("bad model output", [{"name": "image_1", "is_primary": True}])
    project = store.create_project("bad model output", dc)
    paths = {c: write_media(platform, f"badmodel/{c}.png", _png(c)) for c in MODEL_ANSWERS}
    rows = [{"data_unit": store.create_data_unit(dc, {"image_1": {"path": p}})} for p in paths.values()]
    ids = dict(zip(MODEL_ANSWERS, store.create_tasks_bulk(project, rows), strict=True))
    spec = RunSpec(
        platform=config_for(platform, retries=0),
        options=RunOptions(inference_call_timeout_s=5),
        params=ToTaskParams.parse(
            {
                "name": "Bad_Model",
                "project": project,
                "method": "inference",
                "pre_processor": 1,
                "pre_processor_params": {"confidence_threshold": 0.5},
            }
        ),
    )

    async def run(handle: StubHandle, task_ids: list[int]) -> dict[int, Any]:
        monkeypatch.setattr(ray.serve, "get_app_handle", lambda name: handle)
        annotator = InferenceAnnotator(spec, "stub", {})
        await annotator._ready()
        try:
            return {o.task_id: o for o in await annotator.run_batch(task_ids)}
        finally:
            await annotator._client.aclose()
            await annotator._downloader.aclose()

    per_image = StubHandle({c: answer for c, (answer, _) in MODEL_ANSWERS.items()})
    outcomes = asyncio.run(run(per_image, list(ids.values())))
    assert per_image.calls == 1  # one call for the batch
    # the files' bytes went to the model, not decoded pixels
    assert {type(img).__name__ for img in per_image.sent} == {"EncodedImage"}
    for colour, (_, words) in MODEL_ANSWERS.items():
        o, data = outcomes[ids[colour]], store.get_task(ids[colour])["data"]
        if not words:
            assert o.status == "success" and data["objects"][0]["coordinates"]["x"] == 5.0
        elif words == "EMPTY":
            assert o.status == "empty" and data == {"objects": []}, (colour, o.error)
        else:
            assert o.status == "failed" and words in o.error, (colour, o.error)
            assert_clean(o.error, platform.token)
            assert not data

    # the whole answer is not one list per image: every task of the call fails, after one retry
    others = [ids[c] for c in (60, 70)]
    whole = StubHandle(whole={"error": "model crashed"})
    outcomes = asyncio.run(run(whole, others))
    assert whole.calls == 2
    for tid in others:
        assert (
            outcomes[tid].error
            == "the pre-processor returned dict instead of one detection list per image (2)"
        )
    # written: the good answer and the two empty ones (the SDK writes an empty object list)
    assert store.history_counts(task_ids=list(ids.values())) == {ids[10]: 1, ids[60]: 1, ids[70]: 1}
