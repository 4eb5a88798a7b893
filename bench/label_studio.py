"""Predictions/s into a real Label Studio server: totask-ray against LS's own bulk import, by hand.

`python -m bench label-studio [--tasks N] [--runs R]` starts `label-studio==1.23.2` (its own venv,
`devtools/ls_env.py`, from a pre-migrated data dir) on loopback, and for every run seeds fresh
projects with the same N tasks (an image and an annotation JSON each, on a local file server).

Contenders, interleaved, medians of R runs:
- **ls bulk**: the predictions already converted, sent by hand to
  `POST /api/projects/{id}/import/predictions` in chunks of 100: what LS itself can take in, with
  nothing read, downloaded or converted. The ceiling.
- **ls one by one**: `POST /api/predictions` per task, one at a time (what a backend that falls back
  to one task per call does); over at most 200 tasks.
- **totask-ray**: `run_to_task` with the file method on a warm local Ray: each task read, its JSON
  downloaded, the image's size read from its header, converted, validated, written in bulk chunks.

Every run is read back from Label Studio: a contender that did not leave exactly one prediction per
task counts as failed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import environment, local_platform, local_ray, tables

CONFIG = """<View>
  <Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="cat"/><Label value="dog"/></RectangleLabels>
</View>"""
CHUNK = 100
FILE_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), backlog=1024, print=None, access_log=None)
"""
ONE_BY_ONE_MAX = 200
BENCH_PARAMS: dict[str, Any] = {}
BENCH_CONFIG: dict[str, Any] = {}
BENCH_RUN: dict[str, Any] = {}


@contextmanager
def file_server(tasks: int) -> Iterator[str]:
    """The images and annotation files on a second host: an aiohttp static server in its own
    process (in the bench's process it would share a GIL with the driver it measures; `http.server`
    keeps a listen backlog of 5, so under load connections wait for SYN retries of 1-7 s)."""
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="bench-ls-files-"))
    (root / "ann").mkdir()
    Image.new("RGB", (640, 480), (80, 90, 100)).save(root / "img.png")
    for i in range(tasks):
        (root / "ann" / f"{i}.json").write_text(json.dumps(annotation(i)))
    port = environment.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", FILE_SERVER, str(root), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/img.png", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def annotation(i: int) -> dict[str, Any]:
    return {
        "objects": [
            {
                "id": f"o{k}",
                "class_id": (i + k) % 2,
                "type": "bbox",
                "coordinates": {"x": 10 + k * 50, "y": 20, "width": 40, "height": 30},
                "properties": {"confidence": 0.9},
            }
            for k in range(3)
        ]
    }


def converted(task_id: int, i: int) -> dict[str, Any]:
    """The prediction totask-ray writes for task `i`, made here once, outside the timing."""
    from totask_ray.platform.label_studio.convert import to_results
    from totask_ray.platform.label_studio.labeling import parse_labeling_config

    result, score = to_results(annotation(i), parse_labeling_config(CONFIG), {0: "cat", 1: "dog"}, (640, 480))
    return {"task": task_id, "result": result, "score": score, "model_version": "by-hand"}


class Admin:
    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Token {key}"}, timeout=120)

    def project(self, files: str, tasks: int) -> tuple[int, list[int]]:
        r = self.http.post(
            "/api/projects/", json={"title": f"bench-{time.time_ns()}", "label_config": CONFIG}
        )
        r.raise_for_status()
        pid = r.json()["id"]
        rows = [
            {"image": f"{files}/img.png", "annotation": f"{files}/ann/{i}.json", "n": i} for i in range(tasks)
        ]
        r = self.http.post(f"/api/projects/{pid}/import", params={"return_task_ids": "true"}, json=rows)
        r.raise_for_status()
        return pid, list(r.json()["task_ids"])

    def predictions(self, pid: int) -> list[dict[str, Any]]:
        r = self.http.get("/api/predictions/", params={"project": pid})
        r.raise_for_status()
        return r.json()

    def drop(self, pid: int) -> None:
        self.http.delete(f"/api/projects/{pid}/")


def check(admin: Admin, pid: int, ids: list[int]) -> bool:
    got = sorted(p["task"] for p in admin.predictions(pid))
    return got == sorted(ids)


def run_bulk(admin: Admin, pid: int, ids: list[int]) -> float:
    items = [converted(t, i) for i, t in enumerate(ids)]
    t0 = time.perf_counter()
    for k in range(0, len(items), CHUNK):
        admin.http.post(
            f"/api/projects/{pid}/import/predictions", json=items[k : k + CHUNK]
        ).raise_for_status()
    return time.perf_counter() - t0


def run_one_by_one(admin: Admin, pid: int, ids: list[int]) -> float:
    items = [converted(t, i) for i, t in enumerate(ids)]
    t0 = time.perf_counter()
    for item in items:
        admin.http.post("/api/predictions/", json=item).raise_for_status()
    return time.perf_counter() - t0


def run_totask(url: str, token: str, pid: int) -> tuple[float, Any]:
    from totask_ray import LabelStudioConfig, run_to_task

    params = {
        "name": "bench_ls",
        "project": pid,
        "method": "file",
        "target_specification_name": "annotation",
        **BENCH_PARAMS,
    }
    t0 = time.perf_counter()
    result = run_to_task(
        params,
        platform=LabelStudioConfig(host=url, api_key=token, **BENCH_CONFIG),
        allowed_hosts=["127.0.0.1"],
        progress_bar=False,
        ray_address=local_ray.ray_address(),
        **BENCH_RUN,
    )
    return time.perf_counter() - t0, result


def main(args: Any, ray_started: bool = False) -> None:
    from devtools.ls_env import LsEnvError, ensure_ls_venv

    if not ray_started:
        local_ray.start_ray(getattr(args, "ray_cpus", None))
    tasks = args.tasks or (40 if args.smoke else 2000)
    runs = 1 if args.smoke else args.runs
    try:
        ensure_ls_venv(environment.ROOT)
    except LsEnvError as exc:
        tables.say(
            f"label-studio bench skipped: label-studio could not be installed ({str(exc).splitlines()[0]})"
        )
        return
    from devtools.ls_env import bench_server

    with bench_server(environment.ROOT) as ls, file_server(tasks) as files:
        admin = Admin(ls.url, ls.legacy_token)
        rates: dict[str, list[float]] = {"ls bulk": [], "ls one by one": [], "totask-ray": []}
        steady: list[float] = []
        for run in range(runs):
            pid, ids = admin.project(files, tasks)
            s = run_bulk(admin, pid, ids)
            rates["ls bulk"].append(len(ids) / s if check(admin, pid, ids) else 0.0)
            admin.drop(pid)
            n = min(tasks, ONE_BY_ONE_MAX)
            pid, ids = admin.project(files, n)
            s = run_one_by_one(admin, pid, ids)
            rates["ls one by one"].append(len(ids) / s if check(admin, pid, ids) else 0.0)
            admin.drop(pid)
            pid, ids = admin.project(files, tasks)
            s, result = run_totask(ls.url, ls.personal_token, pid)
            ok = result.success_count == tasks and check(admin, pid, ids)
            rates["totask-ray"].append(len(ids) / s if ok else 0.0)
            # the rate once running: the predictions' own creation times, 10 % to 90 %
            made = [local_platform._epoch(p["created_at"]) for p in admin.predictions(pid)]
            steady.append(local_platform.steady_rate(made) or 0.0)
            admin.drop(pid)
            tables.log(
                f"run {run + 1}: "
                + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items())
                + f", totask-ray steady {steady[-1]:.0f}/s"
            )
        bulk = tables.median(rates["ls bulk"])
        rows = [
            [name, tasks if name != "ls one by one" else min(tasks, ONE_BY_ONE_MAX), tables.fmt(tables.median(v)),
             tables.fmt(tables.ratio(tables.median(v), bulk), 2), " ".join(tables.fmt(x) for x in v)]
            for name, v in rates.items()
        ]  # fmt: skip
        rows.append(["totask-ray, steady (10-90 % of writes)", tasks, tables.fmt(tables.median(steady)),
                     tables.fmt(tables.ratio(tables.median(steady), bulk), 2), " ".join(tables.fmt(x) for x in steady)])  # fmt: skip
        tables.say(
            tables.table(
                ["contender", "tasks", "predictions/s", "vs ls bulk", "runs /s"],
                rows,
                title=f"Label Studio 1.23.2, file method, {tasks} tasks, 3 boxes each (medians of {runs})",
            )
        )
        tables.dump_json(
            "label_studio", {"tasks": tasks, "runs": runs, "rates": rates, "totask_steady": steady}
        )
