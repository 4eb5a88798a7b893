"""`preview`: the job on a sample, drawn as one HTML page, and nothing written.

On the seeded faces demo (known face boxes) with one task whose image is broken: the preview runs
the real pipeline (local Ray, the faces app on Serve, the embedded platform over HTTP), and then
the platform is asked whether anything was written; the page's counts are compared with a plain
dry run over the same tasks; and the page is opened in a real headless Chromium, whose screenshot
must show the drawn boxes where the ground-truth faces are, and the failing task's reason.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, config_for, make_project, read_report

from totask_ray import run_to_task
from totask_ray.embedded.seeds import seed_faces_demo
from totask_ray.preview import PreviewPage, preview
from totask_ray.preview.draw import PALETTE
from totask_ray.preview.sample import draw_sample

FAST = {"serve_poll_interval_s": 0.5, "serve_ready_timeout_s": 120, "progress_bar": False, "num_actors": 1}
SAMPLE = 8
WINDOW = (1400, 1300)  # the screenshot's size in CSS px (device scale factor 1)
BROKEN = b"this is not an image"


@pytest.fixture(scope="module")
def faces(platform) -> dict[str, Any]:
    seeded = seed_faces_demo(platform.store, platform.media_dir, tasks=14, seed=1)
    first = seeded["task_ids"]["first"]
    # The first task's image is broken (its task would fail); the second task already holds a box
    # a person drew (shown side by side with what would replace it).
    files = platform.store.data_unit_files(platform.store.get_task(first)["data_unit"])
    (Path(platform.media_dir) / files[0]["path"]).write_bytes(BROKEN)
    held = {"objects": [{"id": "p1", "class_id": 1, "type": "bbox", "properties": {"label": "face"},
                         "coordinates": {"x": 10, "y": 10, "width": 60, "height": 60}}]}  # fmt: skip
    platform.store.update_task(first + 1, data=held)
    seeded["broken"] = first
    seeded["job"] = {
        "name": "Faces_Preview", "project": seeded["project"], "method": "inference",
        "pre_processor": seeded["pre_processor"], "pre_processor_params": seeded["pre_processor_params"],
        "batch_size": 8,
    }  # fmt: skip
    return seeded


@pytest.fixture(scope="module")
def previewed(ray_cluster, platform, faces, tmp_path_factory) -> tuple[PreviewPage, Path, dict, dict]:
    store = platform.store
    ids = list(range(faces["task_ids"]["first"], faces["task_ids"]["last"] + 1))
    before = {t["id"]: t for t in store.tasks_by_ids(ids)}
    out = tmp_path_factory.mktemp("preview") / "preview.html"
    page = preview(faces["job"], platform=config_for(platform), sample=SAMPLE, first=True, out=out, **FAST)
    after = {t["id"]: t for t in store.tasks_by_ids(ids)}
    return page, out, before, after


@pytest.mark.slow
def test_preview_writes_nothing_and_counts_as_the_dry_run(platform, faces, previewed, tmp_path):
    page, out, before, after = previewed
    store = platform.store
    # The platform's own record: no annotate write in the project, no task row changed.
    assert store.history_counts(project_id=faces["project"]) == {}, "preview wrote annotations"
    assert after == before, "preview changed a task"
    assert out.is_file() and out.read_text(encoding="utf-8") == page.html
    sampled = sorted(page.outcomes)
    assert sampled == list(range(faces["task_ids"]["first"], faces["task_ids"]["first"] + SAMPLE))

    # A plain dry run over the same tasks: the page's per-class counts are its counts.
    report = tmp_path / "dry.jsonl"
    job = {**faces["job"], "task_filters": {"id__in": sampled}}
    run_to_task(job, platform=config_for(platform), report=report, dry_run=True, **FAST)
    dry = Counter(
        o["properties"]["label"]
        for rec in read_report(report).values()
        for o in (rec.get("would_write") or {}).get("objects", [])
    )
    truth = {int(k): v for k, v in faces["truth"].items()}
    assert dry["face"] == sum(len(truth[t]) for t in sampled if t != faces["broken"]) > 0
    assert page.counts == dict(dry)
    assert _page_counts(page.html) == dict(dry)

    # The broken image's task fails, and the page says why.
    failed = page.outcomes[faces["broken"]]
    assert failed["status"] == "failed" and "not an image" in failed["reason"], failed
    assert all(o["status"] != "failed" for t, o in page.outcomes.items() if t != faces["broken"])
    assert page.drops == [] and len(page.html.encode()) < 8 * 1024 * 1024
    # Each stage measured on the sample, shown on the page.
    stages = ("listing_page_s", "task_read_s", "image_download_s", "decode_s", "model_call_s", "dry_run_s")
    assert all(page.timings[k] > 0 for k in stages), page.timings
    assert page.html.count("<tr><td>") >= len(stages) and 'id="stages"' in page.html


def test_sample_is_seeded_and_within_the_filters(platform):
    """Random samples repeat for a seed, differ across seeds, and hold only selected tasks."""
    from totask_ray.platform.connect import connect

    project, ids = make_project(platform, [{"files": None}] * 30)  # listing only: no files needed
    first, last = ids[0], ids[-1]
    filters = {"id__gte": first + 5}
    with contextlib.closing(connect(config_for(platform))) as client:
        a, total = draw_sample(client, project, filters, 6, seed=7, page_size=4)
        b, _ = draw_sample(client, project, filters, 6, seed=7, page_size=4)
        c, _ = draw_sample(client, project, filters, 6, seed=8, page_size=4)
        head, _ = draw_sample(client, project, filters, 3, first=True)
    assert total == 25 and a == b != c and len(a) == 6 == len(set(a))
    assert all(first + 5 <= t <= last for t in a + c)
    assert head == [first + 5, first + 6, first + 7]


# -- the page in a real browser --------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser(exe: str, profile: Path, *args: str, url: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=120, check=True)


@pytest.mark.slow
def test_page_in_headless_chromium(faces, previewed, tmp_path):
    exe = _chromium()
    if exe is None:
        print("SKIP reason: no chromium on PATH (.ci/run installs it with apt-get where it can)")
        pytest.skip("no chromium on PATH (.ci/run installs it with apt-get where it can)")
    from PIL import Image

    page, out, _, _ = previewed
    url = out.resolve().as_uri()
    dom = _browser(exe, tmp_path / "profile-dom", "--dump-dom", url=url).stdout.decode("utf-8")
    shot = tmp_path / "preview.png"
    _browser(exe, tmp_path / "profile-shot", f"--screenshot={shot}", url=url)
    pixels = Image.open(shot).convert("RGB")
    assert pixels.size == WINDOW

    elements = _elements(dom)
    thumbs = {int(e["data-task"]): e for e in elements if "thumb" in e.get("class", "").split()}
    truth = {int(k): v for k, v in faces["truth"].items()}
    checked = 0
    for tid, el in thumbs.items():
        left, top, width, height = (int(v) for v in el["data-rect"].split(","))
        if top + height > WINDOW[1] or left + width > WINDOW[0]:
            continue  # below the fold: not on the screenshot
        scale = float(el["data-scale"])
        boxes = [[left + x * scale, top + y * scale, w * scale, h * scale] for x, y, w, h in truth[tid]]
        _check_boxes(pixels, (left, top, width, height), boxes, f"task {tid}")
        checked += 1
    assert checked >= 4, f"only {checked} thumbnails were on the screenshot"
    assert any(truth[t] for t in thumbs) and any(not truth[t] for t in thumbs if t in truth)

    # The failing task's reason is on the page, on screen, in its red.
    reasons = [e for e in elements if "reason" in e.get("class", "").split() and e.get("data-rect")]
    card = next(e for e in reasons if int(e["data-task"]) == faces["broken"])
    assert "not an image" in card["text"]
    left, top, width, height = (int(v) for v in card["data-rect"].split(","))
    assert width > 0 and height > 0 and top + height <= WINDOW[1]
    red = sum(
        1
        for x in range(left, left + width)
        for y in range(top, top + height)
        if _near(pixels.getpixel((x, y)), (0xB0, 0x00, 0x20), 60)
    )
    assert red > 20, "the failing task's reason is not drawn on the screenshot"
    # The counts table, as the browser has it.
    assert re.search(r'<tr data-class="face">.*?<td class="count">(\d+)</td>', dom, re.S).group(1) == str(
        page.counts["face"]
    )
    # README's picture of the page: this browser's screenshot, in 256 colours (a third of the bytes)
    pixels.quantize(colors=256).save(REPO / "docs" / "preview.png", optimize=True)


def _near(px: tuple[int, int, int], colour: tuple[int, int, int], tol: int) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, colour, strict=True))


def _is_box_colour(px: tuple[int, int, int]) -> bool:
    r, g, b = px
    return r > 170 and b > 170 and g < 100  # PALETTE[0] (magenta) after JPEG


def _check_boxes(img: Any, rect: tuple[int, int, int, int], boxes: list[list[float]], what: str) -> None:
    """Every truth box's outline is traced by drawn pixels, and little is drawn away from them."""
    assert PALETTE[0] == (255, 0, 255)
    left, top, width, height = rect
    for x, y, w, h in boxes:
        tol = max(4, round(0.15 * w))  # a found box matches its truth at IoU >= 0.5 (0.79 here)
        points = [(x + t * w, y) for t in (i / 10 for i in range(1, 10))]
        points += [(x + t * w, y + h) for t in (i / 10 for i in range(1, 10))]
        points += [(x, y + t * h) for t in (i / 10 for i in range(1, 10))]
        points += [(x + w, y + t * h) for t in (i / 10 for i in range(1, 10))]
        hits = 0
        for px, py in points:
            xs = range(max(left, round(px) - tol), min(left + width, round(px) + tol + 1))
            ys = range(max(top, round(py) - tol), min(top + height, round(py) + tol + 1))
            hits += any(_is_box_colour(img.getpixel((a, b))) for a in xs for b in ys)
        assert hits >= 0.9 * len(points), (
            f"{what}: box {[x, y, w, h]} outlined at {hits}/{len(points)} points"
        )

    def near_a_box(a: int, b: int) -> bool:
        return any(
            x - 0.2 * w <= a <= x + 1.2 * w and y - 0.2 * h <= b <= y + 1.2 * h for x, y, w, h in boxes
        )

    stray = sum(
        1
        for a in range(left, left + width)
        for b in range(top, top + height)
        if _is_box_colour(img.getpixel((a, b))) and not near_a_box(a, b)
    )
    assert stray <= 0.002 * width * height, f"{what}: {stray} box-coloured pixels away from every face"


class _Collect(HTMLParser):
    """Elements with their attributes and their text (enough of the DOM dump for the checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict[str, str]] = []
        self._open: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = {k: v or "" for k, v in attrs} | {"tag": tag, "text": ""}
        self.elements.append(el)
        if tag not in ("img", "br", "meta", "input"):
            self._open.append(el)

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for el in self._open:
            el["text"] += data


def _elements(html: str) -> list[dict[str, str]]:
    parser = _Collect()
    parser.feed(html)
    return parser.elements


def _page_counts(html: str) -> dict[str, int]:
    rows = re.findall(r'<tr data-class="([^"]+)">.*?<td class="count">(\d+)</td>', html, re.S)
    return {json.loads(f'"{name}"'): int(n) for name, n in rows}


@pytest.mark.slow
def test_cli_preview_of_the_file_method(ray_cluster, platform, tmp_path):
    """`totask-ray preview` on the file demo: the converted annotations, drawn on the primary image,
    counted as a dry run counts them, and nothing written."""
    from typer.testing import CliRunner

    from totask_ray.cli import app
    from totask_ray.embedded.seeds import seed_files_demo

    seeded = seed_files_demo(platform.store, platform.media_dir, tasks=10, seed=4)
    job = {"name": "Files_Preview", "project": seeded["project"], "method": "file",
           "target_specification_name": "annotation_data"}  # fmt: skip
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    out = tmp_path / "files.html"
    args = ["preview", str(job_file), "--sample", "4", "--seed", "5", "--out", str(out),
            "--host", platform.url, "--token", platform.token, "--num-actors", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert platform.store.history_counts(project_id=seeded["project"]) == {}
    html = out.read_text(encoding="utf-8")
    assert f"{out}: 4 of 10 tasks, 0 would fail" in result.output
    ids = [int(t) for t in re.findall(r'<img class="thumb"[^>]* data-task="(\d+)"', html)]
    assert len(ids) == 4, "every sampled task has its picture"

    report = tmp_path / "dry.jsonl"
    run_to_task({**job, "task_filters": {"id__in": ids}}, platform=config_for(platform), report=report,
                dry_run=True, **FAST)  # fmt: skip
    dry = Counter(
        o["properties"].get("label")
        for rec in read_report(report).values()
        for o in (rec.get("would_write") or {}).get("objects", [])
    )
    assert sum(dry.values()) > 0 and _page_counts(html) == dict(dry)


def test_drops_are_counted_by_the_runs_own_filters():
    """Each stage of `apply_params`, then the label mapping under `unmapped_labels: drop`, is
    charged with what it removed (the functions the run applies, replayed stage by stage)."""
    from totask_ray.methods.labels import LabelMapping
    from totask_ray.params import UnmappedLabels
    from totask_ray.platform.models import ProjectClass
    from totask_ray.preview.drops import UNMAPPED, Drops, _count_one
    from totask_ray.serving.params import InferenceParams

    found = [
        {"bbox": [0, 0, 10, 10], "class_id": 0, "label": "face", "score": 0.9},
        {"bbox": [20, 20, 10, 10], "class_id": 0, "label": "face", "score": 0.8},
        {"bbox": [40, 40, 10, 10], "class_id": 0, "label": "face", "score": 0.3},
        {"bbox": [60, 60, 10, 10], "class_id": 1, "label": "cat", "score": 0.95},
    ]
    full = InferenceParams.model_validate({"threshold": 0.5, "max_objects": 2})
    mapping = LabelMapping.build([ProjectClass(id=1, name="face")], None, {}, UnmappedLabels.DROP)
    drops = Drops(threshold=0.5)
    _count_one(found, full, mapping, drops)
    assert drops.rows() == [
        ("below the confidence threshold", "face", 1),
        ("over max_objects", "face", 1),
        (UNMAPPED, "cat", 1),
    ]
    assert drops.below_threshold == {"face": [0.3]}


def test_the_page_keeps_under_its_byte_cap():
    """Past the cap, tasks keep their outcome and lose their picture, saying so."""
    from helpers import face_jpegs

    from totask_ray.preview.collect import TaskView
    from totask_ray.preview.drops import Drops
    from totask_ray.preview.page import TEXT_RESERVE, render

    images = face_jpegs(6, seed=5)
    views = [
        TaskView(i, "success", "done", "", would_write={"objects": []}, image=body)
        for i, (body, _, _) in enumerate(images, 1)
    ]
    cap = TEXT_RESERVE + 60_000  # room for two or three thumbnails
    page = render(views, job="cap", total=6, how="test", message="", classes=["face"], drops=Drops(),
                  max_bytes=cap)  # fmt: skip
    shown = page.html.count('<img class="thumb"')
    assert 1 <= shown < len(views) and len(page.html.encode()) <= cap
    assert page.html.count("picture left out: the page is at its size cap") == len(views) - shown
