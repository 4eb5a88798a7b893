"""`totask-ray demo`: the whole product on one machine, nothing to configure.

Starts the embedded platform and a local Ray, seeds a demo project, runs the action, checks the
written tasks on the platform, prints the result, and stops what it started.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("totask_ray")

# The CPU models take ~0.3 s an image here: small inference projects keep the demo short.
INFERENCE_DEMO_TASKS = 24
# Both pre-processors ship inside wheels (OpenCV's Haar cascade, RapidOCR's PP-OCR models), so the
# inference demos deploy them on the local Ray without downloading anything.
INFERENCE_RUN = {"serve_poll_interval_s": 1.0}


def _inference_params(name: str, threshold: float) -> Any:
    def make(seeded: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "project": seeded["project"],
            "method": "inference",
            "pre_processor": seeded["pre_processor"],
            "pre_processor_params": seeded.get("pre_processor_params") or {"confidence_threshold": threshold},
            "batch_size": 8,
        }

    return make


def inference_demo_runs() -> list[tuple[str, Any, dict[str, Any]]]:
    """(demo seeder name, params from its seeded ids, run options) for each demo run."""
    return [
        ("faces", _inference_params("Demo_Faces", 0.5), INFERENCE_RUN),
        ("ocr", _inference_params("Demo_OCR", 0.5), INFERENCE_RUN),
    ]


def _file_params(seeded: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "Demo_File_Annotation",
        "description": "Apply the seeded annotation JSON files to pending and in-progress tasks",
        "project": seeded["project"],
        "task_filters": {"status__in": ["pending", "in_progress"]},
        "method": "file",
        "target_specification_name": "annotation_data",
    }


def run_demo(method: str = "file", tasks: int = 200, data_dir: Path | None = None) -> int:
    from totask_ray.cluster import ensure_ray
    from totask_ray.console import print_result
    from totask_ray.embedded.seeds import DEMOS
    from totask_ray.embedded.server import LocalPlatform
    from totask_ray.errors import ToTaskError
    from totask_ray.platform.synapse.client import SynapseClient, SynapseConfig
    from totask_ray.run.driver import run_to_task

    if method not in ("file", "inference", "all"):
        print(f"unknown method {method!r}: use file, inference or all")
        return 1
    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="totask-demo-"))
    platform = LocalPlatform(data_dir=root)
    platform.start()
    started_ray = False
    try:
        print(f"platform: {platform.url} (data in {root})")
        runs = _demo_runs(method)
        started_ray = ensure_ray()
        config = SynapseConfig(host=platform.url, access_token=platform.token)
        code = 0
        for demo_name, make_params, run_options in runs:
            n = tasks if demo_name == "files" else min(tasks, INFERENCE_DEMO_TASKS)
            seeded = DEMOS[demo_name](platform.store, platform.media_dir, tasks=n)
            print(
                f"seeded demo '{demo_name}': " + json.dumps({k: v for k, v in seeded.items() if k != "truth"})
            )
            params = make_params(seeded)
            report = root / f"report-{demo_name}.jsonl"
            try:
                result = run_to_task(params, platform=config, create_job=True, report=report, **run_options)
            except ToTaskError as exc:
                print(f"ToTask failed: {exc}")
                return 1
            print_result(result)
            with SynapseClient(config) as client:
                written = _check_written(client, report)
            print(f"checked on the platform: {written} task(s) hold the written annotation; report: {report}")
            if "truth" in seeded:
                print(_truth_summary(platform.store, seeded))
            if demo_name != "files" and started_ray:
                _delete_serve_apps()  # the next demo's pre-processor and its actors need the CPUs
            # Face-free images are written as `empty` (the SDK's rule), not failed: a demo run
            # with any failed task (exit 2) or a failed run (exit 1) makes the demo fail.
            code = max(code, result.exit_code)
        return code
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        platform.stop()


def _demo_runs(method: str) -> list[tuple[str, Any, dict[str, Any]]]:
    file_run = [("files", _file_params, {})]
    if method == "file":
        return file_run
    return inference_demo_runs() if method == "inference" else file_run + inference_demo_runs()


def _check_written(client: Any, report: Path, sample: int = 20) -> int:
    """Read back a sample of the tasks the report says were written: their data must be there."""
    from totask_ray.pipeline.outcomes import read_report

    checked = 0
    for rec in read_report(str(report)):
        if rec.get("written"):
            task = client.get_task(rec["task_id"])
            if task.data and task.data.get("objects") is not None:
                checked += 1
            if checked >= sample:
                break
    return checked


def _truth_summary(store: Any, seeded: dict[str, Any]) -> str:
    """How the written annotations compare with the demo's ground truth."""
    from totask_ray.embedded.seeds import match_faces

    truth = {int(k): v for k, v in seeded["truth"].items()}
    objects = {tid: (store.get_task(tid)["data"] or {}).get("objects", []) for tid in truth}
    if seeded.get("demo") == "ocr":
        exact = sum(
            "\n".join(o["properties"].get("text", "") for o in objects[t]) == text
            for t, text in truth.items()
        )
        return f"OCR: {exact} of {len(truth)} images read exactly"
    found = missed = extra = 0
    for tid, boxes in truth.items():
        got = [
            [o["coordinates"][k] for k in ("x", "y", "width", "height")]
            for o in objects[tid]
            if o["type"] == "bbox"
        ]
        m = match_faces(boxes, got)
        found += len(boxes) - len(m["missed"])
        missed += len(m["missed"])
        extra += len(m["extra"])
    return f"faces: {found} of {found + missed} true faces found with IoU >= 0.5, {extra} extra detections"


def _delete_serve_apps() -> None:
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name)
