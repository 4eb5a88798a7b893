"""The product as users run it: the CLI (exit codes, no token anywhere), `ray job submit` to a
`ray start --head` cluster, and a two-node cluster where work lands on both nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import (
    BIN,
    REPO,
    cli_env,
    faces_release,
    good_unit,
    job_submit,
    make_project,
    ray_head,
    read_report,
)


def _env(platform, **extra: str) -> dict[str, str]:
    return cli_env(platform, PYTHONPATH=str(REPO / "tests"), **extra)


def _job_file(tmp_path: Path, **params) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump({"name": "Cli_Job", "target_specification_name": "annotation_data", **params})
    )
    return job


@pytest.fixture(scope="module")
def gcs_address(ray_cluster):
    return ray_cluster.get_runtime_context().gcs_address


@pytest.mark.slow
def test_cli_exit_codes_and_the_token_appears_nowhere(platform, gcs_address, tmp_path):
    units = [good_unit(platform, i, "cli") for i in range(5)] + [
        {"files": {"image_1": {"path": "cli/img.png"}}}
    ]
    project, ids = make_project(platform, units)
    job = _job_file(tmp_path, project=project)
    report = tmp_path / "report.jsonl"
    cmd = [str(BIN / "totask-ray"), "run", str(job), "--address", gcs_address, "--report", str(report),
           "--num-actors", "1"]  # fmt: skip

    proc = subprocess.run([*cmd, "--job-id", str(platform.store.create_job("to_task"))], env=_env(platform),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]  # some tasks failed
    assert (
        f"[Task {ids[-1]}] Failed: the data unit has no file under specification 'annotation_data'"
        in proc.stderr
    )
    assert "Progress: 100.0% (6/6)" in proc.stderr
    assert "5 succeeded, 1 failed" in proc.stdout
    outcomes = read_report(report)
    assert sorted(outcomes) == ids

    all_good, _ = make_project(platform, [good_unit(platform, i, "cli2") for i in range(3)])
    ok = subprocess.run([*cmd[:2], str(_job_file(tmp_path, project=all_good)), *cmd[3:]], env=_env(platform),
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]

    bad_params = _job_file(tmp_path, project=project, name="has space", batch_size=0)
    bad = subprocess.run(
        [*cmd[:2], str(bad_params)], env=_env(platform), capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1
    assert "name: must not contain whitespace" in bad.stderr and "batch_size" in bad.stderr
    assert "Traceback" not in bad.stderr

    critical = subprocess.run([*cmd[:2], str(_job_file(tmp_path, project=10**8)), *cmd[3:]], env=_env(platform),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert critical.returncode == 1
    assert "Project not found" in critical.stderr and "Traceback" not in critical.stderr

    token = platform.token
    texts = {"stdout": proc.stdout + ok.stdout + critical.stdout, "stderr": proc.stderr + ok.stderr + critical.stderr,
             "report": report.read_text()}  # fmt: skip
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    job_ids = [row[0] for row in platform.store.execute("SELECT id FROM jobs").fetchall()]
    texts["jobs"] = json.dumps([platform.store.get_job(j) for j in job_ids])
    texts["logs"] = json.dumps(platform.store.logs())
    leaks = [where for where, text in texts.items() if token in text]
    assert leaks == [], f"the platform token leaked into {leaks}"


@pytest.mark.slow
@pytest.mark.usefixtures("serve_http_port")
def test_verbose_shows_rays_own_logs_on_an_inference_run(platform, gcs_address, tmp_path):
    """`--verbose` is for seeing what Ray does. An inference run reaches Ray first in its prepare
    step (to bring the pre-processor up), which once connected without it: the annotate step then
    found Ray connected and its `--verbose` changed nothing."""
    from ray import serve

    from totask_ray.embedded.seeds import write_sample_images

    image = write_sample_images(platform.media_dir)["astronaut"]["path"]
    store = platform.store
    dc = store.create_data_collection("verbose", [{"name": "image_1", "is_primary": True}])
    project = store.create_project("verbose", dc)
    store.create_tasks_bulk(
        project, [{"data_unit": store.create_data_unit(dc, {"image_1": {"path": image}})}]
    )
    release = faces_release(platform, "1.0.0-verbose")
    job = _job_file(tmp_path, project=project, method="inference", pre_processor=release)
    try:
        proc = subprocess.run(
            [str(BIN / "totask-ray"), "run", str(job), "--address", gcs_address, "--num-actors", "1", "--verbose"],
            env=_env(platform), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        serve.delete("faces@1.0.0-verbose")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ray.init logs its connection only when the run lets Ray configure its logging (`verbose_ray`)
    assert "Connecting to existing Ray cluster" in proc.stderr, (
        f"Ray's own logs are missing from a --verbose inference run: {proc.stderr[-2000:]}"
    )


@pytest.mark.slow
def test_ray_job_submit_to_a_ray_start_cluster(platform, tmp_path):
    units = [good_unit(platform, i, "jobsubmit") for i in range(20)]
    project, ids = make_project(platform, units)
    workdir = tmp_path / "job"
    workdir.mkdir()
    _job_file(workdir, project=project)
    env = _env(platform, RAY_AUTH_MODE="token")
    report = tmp_path / "job-report.jsonl"
    with ray_head(env, "rayjob") as head:
        submit = job_submit(
            head,
            [f"--working-dir={workdir}",
             "--", "python", "-m", "totask_ray", "run", "job.yaml", "--report", str(report)],
            env,
        )  # fmt: skip
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert "20 succeeded, 0 failed" in submit.stdout
        assert platform.token not in submit.stdout + submit.stderr
    for tid, unit in zip(ids, units, strict=True):
        assert platform.store.get_task(tid)["data"] == unit["expected"]
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}
    assert len(read_report(report)) == len(ids)


TWO_NODES = textwrap.dedent(
    """
    import json, os, sys
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from totask_ray import run_to_task
    from totask_ray.platform.synapse.client import SynapseConfig

    url, token, project, report = sys.argv[1:5]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    # 1.5 CPUs per actor on 2-CPU nodes: two actors can only run on two different nodes.
    result = run_to_task({"name": "Two_Nodes", "project": int(project), "target_specification_name": "annotation_data"},
                         platform=SynapseConfig(host=url, access_token=token), report=report,
                         num_actors=2, actor_cpus=1.5, progress_bar=False)
    nodes = sorted({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    print(json.dumps({"success": result.success_count, "failed": result.failed_count, "nodes": nodes}))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_annotators_run_on_both_nodes_of_a_two_node_cluster(platform, tmp_path):
    units = [good_unit(platform, i, "twonode") for i in range(400)]
    project, ids = make_project(platform, units)
    report = tmp_path / "two.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", TWO_NODES, platform.url, platform.token, str(project), str(report)],
        env=_env(platform), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["success"] == len(ids) and summary["failed"] == 0
    outcomes = read_report(report)
    used = {rec["node"] for rec in outcomes.values()}
    assert used == set(summary["nodes"]) and len(used) == 2, used
    assert set(platform.store.history_counts(task_ids=ids).values()) == {1}
