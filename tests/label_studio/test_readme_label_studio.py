"""README's "Label Studio" section, run as a new user would: its commands as written, in order.

The section's bash blocks and its `# faces.yaml` block are read out of README.md, so an edit there
is what runs here. The one line not executed is the install (`python3.11 -m venv .venv-ls && pip
install label-studio==...`): it is checked to be the venv and the version `devtools.ls_env` builds,
which the suite has already built (a second install into a venv in use would race the other Label
Studio tests). Everything else runs in a scratch folder that links the checkout's `.venv`,
`.venv-ls` and `serve_apps`: a Label Studio started fresh (its own data dir, migrations included),
a project made and images imported with curl, and `totask-ray run` on the faces model.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, face_jpegs, free_port

from devtools.ls_env import LS_PACKAGE, LS_VERSION, VENV_DIR
from totask_ray.platform.label_studio.filters import KNOWN

SECTION = re.compile(r"^## Label Studio\n(.*?)^## ", re.S | re.M)
BLOCK = re.compile(r"^```(bash|yaml)\n(.*?)^```", re.S | re.M)


def _section() -> str:
    found = SECTION.search((REPO / "README.md").read_text())
    assert found, "README.md has no '## Label Studio' section"
    return found.group(1)


def _blocks() -> tuple[str, list[str], str]:
    """(the install line, the other bash blocks in order, the faces.yaml block)."""
    bash = [body for kind, body in BLOCK.findall(_section()) if kind == "bash"]
    [job] = [
        body for kind, body in BLOCK.findall(_section()) if kind == "yaml" and body.startswith("# faces.yaml")
    ]
    first, _, rest = bash[0].partition("\n")
    return first, [rest, *bash[1:]], job


def test_readme_lists_every_filter_label_studio_takes():
    """Each filter the client maps is named in README (the list a user reads), and the install line
    pins the version the suite tests against."""
    section = _section()
    bullet = section[section.index("- **Filters:**") :].split("\n- ")[0]
    named = set(re.findall(r"`([a-z_]+)", bullet))
    assert set(KNOWN) <= named, f"README's filter list lacks {sorted(set(KNOWN) - named)}"
    install, _, _ = _blocks()
    assert (
        install == f"python3.11 -m venv {VENV_DIR} && {VENV_DIR}/bin/pip install {LS_PACKAGE}=={LS_VERSION}"
    )


def _environment(port: int, ray_address: str) -> dict[str, str]:
    """A user's shell: none of the suite's platform variables, this Ray cluster, LS on a free port."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "SYNAPSE_", "LABEL_STUDIO_"))
    }
    env.update(LS_PORT=str(port), RAY_ADDRESS=ray_address, RAY_USAGE_STATS_ENABLED="0")
    return env


def _run_script(cwd: Path, script: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        ["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        log = (cwd / "ls.log").read_text()[-2000:] if (cwd / "ls.log").exists() else "(no ls.log)"
        pytest.fail(f"README's commands did not finish in {timeout:.0f} s:\n{out[-3000:]}\nls.log:\n{log}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


CHECKS = """
# (the test's own lines: what Label Studio holds now, README's run line again, Label Studio stopped)
curl -sf -H "Authorization: Token $LABEL_STUDIO_API_KEY" "$LABEL_STUDIO_URL/api/tasks/?project=1&page_size=100&fields=all" > tasks.json
printf %s "$LABEL_STUDIO_API_KEY" > key.txt
set +e
{run_line} > rerun.log 2>&1
echo "RERUN_RC=$?"
kill %1
"""


def test_readme_label_studio_commands_run_as_written(label_studio_venv, ray_cluster, tmp_path):
    import json

    from ray import serve

    from totask_ray.embedded.seeds.faces import iou

    _, blocks, job = _blocks()
    [run_line] = [line for line in blocks[-1].splitlines() if line.startswith(".venv/bin/totask-ray run")]
    for name in (".venv", VENV_DIR, "serve_apps"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "images").mkdir()
    images = face_jpegs(4, seed=11)  # three with a face, the last without
    for i, (body, _, _) in enumerate(images):
        (tmp_path / "images" / f"photo{i}.jpg").write_bytes(body)
    (tmp_path / "faces.yaml").write_text(job)
    script = "set -euo pipefail\n" + "\n".join(blocks) + CHECKS.format(run_line=run_line)
    apps_before = set(serve.status().applications)
    # Label Studio's first start pays for its migrations (about 30 s), the run for the model's start
    done = _run_script(
        tmp_path, script, _environment(free_port(), ray_cluster.get_runtime_context().gcs_address), 480
    )
    assert done.returncode == 0 and "RERUN_RC=1" in done.stdout, done.stdout[-3000:]

    # in Label Studio afterwards: one prediction per image, each face where it was pasted
    tasks = json.loads((tmp_path / "tasks.json").read_text())["tasks"]
    by_file = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in tasks}
    assert sorted(by_file) == [f"photo{i}.jpg" for i in range(len(images))], sorted(by_file)
    for i, (_, truth, (w, h)) in enumerate(images):
        [pred] = by_file[f"photo{i}.jpg"]["predictions"]
        assert pred["model_version"] == "faces_v1"
        boxes = [[r["value"][k] * s / 100 for k, s in (("x", w), ("y", h), ("width", w), ("height", h))]
                 for r in pred["result"]]  # fmt: skip
        assert len(boxes) == len(truth), (i, boxes, truth)
        assert all(max(iou(t, b) for b in boxes) >= 0.5 for t in truth), (i, boxes, truth)
        assert all(r["value"]["rectanglelabels"] == ["face"] for r in pred["result"])
    # the re-run README promises: nothing to do, said before any model starts
    rerun = (tmp_path / "rerun.log").read_text()
    assert "No tasks found matching filters" in rerun, rerun[-3000:]
    assert "pre-processor faces@" not in rerun, rerun[-3000:]  # neither started nor looked for
    # on a cluster the model stays deployed for the next run, as README says (an earlier test may
    # have left it there already); this test removes it only if it put it there
    after = set(serve.status().applications)
    assert "faces@1.0.0" in after and after - apps_before <= {"faces@1.0.0"}, (apps_before, after)
    if "faces@1.0.0" not in apps_before:
        serve.delete("faces@1.0.0")
    # the key README made never reached the output or the run's report
    key = (tmp_path / "key.txt").read_text()
    assert len(key) == 40 and key not in done.stdout + rerun + (tmp_path / "faces.jsonl").read_text()
