"""What a run prints: the workers' warnings reach the driver's output (and so `ray job logs`),
Ray's and Serve's own chatter does not. A CLI inference run over the faces app, as a user runs it,
with a plugin whose inference hook warns once per task in the annotator actors."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import BIN, cli_env, faces_release

from totask_ray.embedded.seeds.faces import seed_faces_demo

PLUGIN = """
import logging
import warnings

from totask_ray import ToTask as Base


class ToTask(Base):
    def convert_data_from_inference(self, inference_data, task_data=None):
        logging.getLogger("my_plugin").warning("plugin saw %d objects", len(inference_data.get("objects", [])))
        warnings.warn("plugin hook is deprecated", UserWarning)
        return super().convert_data_from_inference(inference_data, task_data)
"""

NOISE = {
    "Serve's controller and proxy": "(ServeController pid=",
    "Serve's proxy": "(ProxyActor pid=",
    "the long polls the annotators let go of": "LongPollHost errored",
    "Serve's client INFO lines": "SharedRouterLongPollClient",
    "each worker's raylet log-level notice": "(raylet)",
}


@pytest.mark.slow
def test_worker_warnings_reach_the_driver_and_ray_chatter_does_not(platform, ray_cluster, tmp_path):
    seeded = seed_faces_demo(platform.store, platform.media_dir, tasks=4, seed=7)
    release = faces_release(platform, "1.0.0-logs")
    (tmp_path / "warnplugin.py").write_text(PLUGIN)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"name": "Logs", "project": seeded["project"], "method": "inference",
                               "pre_processor": release, "pre_processor_params": seeded["pre_processor_params"]}))  # fmt: skip
    gcs = ray_cluster.get_runtime_context().gcs_address
    run = subprocess.run(
        [str(BIN / "totask-ray"), "run", str(job), "--address", gcs, "--plugin", "warnplugin:ToTask"],
        cwd=tmp_path, env=cli_env(platform, PYTHONPATH=str(tmp_path)), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    # from the annotator actors, with the actor named: a logger's warning and a Python warning
    assert "MapBatches(InferenceAnnotator)) pid=" in out and "plugin saw" in out, out[-3000:]
    assert "UserWarning: plugin hook is deprecated" in out, out[-3000:]
    found = {what: marker for what, marker in NOISE.items() if marker in out}
    assert not found, f"the run printed {sorted(found)}:\n{out[-3000:]}"
    from ray import serve

    serve.delete("faces@1.0.0-logs")
