"""`totask-ray kube render` and `totask-ray serve config`: KubeRay manifests from a job file.

No Kubernetes runs here, so each part is checked by what can judge it:
- structure, by JSON schemas of the KubeRay v1 fields the manifests use (totask_ray/kube/schemas/,
  from KubeRay v1.7.0's API types, every field present since v1.2), strict about unknown keys, on
  the base and on each overlay as `kubectl kustomize` builds it. A schema cannot check KubeRay's CEL
  rules, its admission webhook or the operator's own Go validation (ray-operator/controllers/ray/
  utils/validation.go); the few of those rules the manifests must keep (clusterSelector without
  backoffLimit, a TTL only with shutdownAfterJobFinishes, minReplicas <= maxReplicas) are asserted
  one by one below;
- content, by Ray itself: the RayService's serveConfigV2 parses with Ray Serve's own schema and is
  deployed with `serve deploy` onto a `ray start` cluster, and the RayJob's entrypoint and runtime
  env are submitted with `ray job submit` to it, annotating seeded projects on the embedded platform;
- the image, by its FROM line against the Ray pin in pyproject.toml.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helpers import (
    BIN,
    REPO,
    cli_env,
    faces_config,
    good_unit,
    job_submit,
    make_project,
    quiet_port,
    ray_head,
    read_report,
    wait_until,
)
from typer.testing import CliRunner

from totask_ray.cli import app
from totask_ray.kube import manifests as m
from totask_ray.kube.inputs import RenderError, read_job
from totask_ray.kube.options import JOB_MOUNT, REPORT_MOUNT, KubeOptions
from totask_ray.kube.schemas import schema_for
from totask_ray.serving.application import serve_application
from totask_ray.serving.config import PreProcessorRelease, load_release_config
from totask_ray.serving.node_types import node_types_from_cluster_yaml

FACES = REPO / "serve_apps" / "faces"
TOKEN = "kube-secret-token-4f1c"  # a credential that must appear in no rendered file
runner = CliRunner()


def _job(tmp_path: Path, method: str = "file", **extra: Any) -> Path:
    params = {"name": "Kube_Job", "project": 12, "method": method, **extra}
    if method == "file":
        params.setdefault("target_specification_name", "annotation_data")
    else:
        params.setdefault("pre_processor", 34)
    path = tmp_path / f"job-{method}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _render(tmp_path: Path, method: str, *args: str, job: Path | None = None) -> Path:
    out = tmp_path / f"out-{method}"
    job = job or _job(tmp_path, method)
    release = ["--release", f"34={FACES}"] if method == "inference" else []
    result = runner.invoke(
        app,
        ["kube", "render", str(job), "--image", "reg.example/totask:0.1", "--out", str(out), *release, *args],
    )
    assert result.exit_code == 0, result.output
    return out


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _built(out: Path, overlay: str) -> list[dict]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(out / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def _base(out: Path) -> dict[str, dict]:
    kustomization = yaml.safe_load((out / "base" / "kustomization.yaml").read_text())
    return _by_kind([d for name in kustomization["resources"] for d in _docs(out / "base" / name)])


def _validate(doc: dict) -> None:
    jsonschema.validate(doc, schema_for(doc["kind"]))


def _specs(docs: dict[str, dict]) -> list[dict]:
    """Every RayClusterSpec among the manifests (the warm cluster's, the job's, the service's)."""
    out = [docs["RayCluster"]["spec"]]
    if "rayClusterSpec" in docs["RayJob"]["spec"]:
        out.append(docs["RayJob"]["spec"]["rayClusterSpec"])
    if "RayService" in docs:
        out.append(docs["RayService"]["spec"]["rayClusterConfig"])
    return out


def _operator_rules(docs: dict[str, dict]) -> None:
    """Rules of KubeRay's Go validation (validation.go) that a schema cannot express."""
    job = docs["RayJob"]["spec"]
    assert ("rayClusterSpec" in job) != ("clusterSelector" in job), "one of rayClusterSpec or clusterSelector"
    if "clusterSelector" in job:
        assert job["clusterSelector"].get(m.CLUSTER_LABEL), (
            "cluster name in ClusterSelector should not be empty"
        )
        assert not job.get("backoffLimit"), "BackoffLimit is incompatible with ClusterSelector mode"
    if not job.get("shutdownAfterJobFinishes"):
        assert not job.get("ttlSecondsAfterFinished"), "TTL needs shutdownAfterJobFinishes"
    for spec in _specs(docs):
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["maxReplicas"]
    for doc in docs.values():
        name = doc["metadata"]["name"]
        assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


@pytest.mark.parametrize("method", ["file", "inference"])
def test_every_manifest_of_base_and_overlays_matches_the_kuberay_schema(tmp_path, method):
    out = _render(tmp_path, method)
    base = _base(out)
    expected = {"RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim"}
    assert set(base) == expected | ({"RayService"} if method == "inference" else set())
    for doc in base.values():
        _validate(doc)
    _operator_rules(base)
    _validate(_docs(out / "secret.example.yaml")[0])
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlays were not built (the base was checked)")
    for overlay in ("cpu", "gpu", "warm"):
        built = _by_kind(_built(out, overlay))
        assert set(built) == set(base), overlay
        for doc in built.values():
            _validate(doc)
        _operator_rules(built)
        groups = [[g["groupName"] for g in spec["workerGroupSpecs"]] for spec in _specs(built)]
        if overlay == "cpu":
            assert all(names == [m.CPU_GROUP] for names in groups), groups
        else:
            assert all(names == [m.CPU_GROUP, m.GPU_GROUP] for names in groups), groups


def test_the_schema_is_strict_about_unknown_keys_and_types(tmp_path):
    cluster = _base(_render(tmp_path, "file"))["RayCluster"]
    typo = json.loads(json.dumps(cluster))
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # maxReplicas, misspelt
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        _validate(typo)
    number = json.loads(json.dumps(cluster))
    number["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay takes strings only
    with pytest.raises(jsonschema.ValidationError):
        _validate(number)


def test_the_cluster_holds_no_work_on_the_head_and_scales_both_pools_from_zero(tmp_path):
    base = _base(_render(tmp_path, "inference"))
    for spec in _specs(base):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        cpu, gpu = spec["workerGroupSpecs"]
        assert cpu["minReplicas"] == gpu["minReplicas"] == cpu["replicas"] == gpu["replicas"] == 0
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
        assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        pods = [spec["headGroupSpec"]["template"], cpu["template"], gpu["template"]]
        for pod in pods:
            (container,) = pod["spec"]["containers"]
            assert container["envFrom"] == [{"secretRef": {"name": "totask-platform"}}]
    # the capacity gate reads the rendered RayCluster as it reads a cluster launcher config
    types = {t.name: t for t in node_types_from_cluster_yaml(base["RayCluster"])}
    assert types[m.GPU_GROUP].resources == {"CPU": 8.0, "GPU": 1.0} and types[m.GPU_GROUP].min_workers == 0
    assert types[m.CPU_GROUP].resources == {"CPU": 8.0}


def test_the_rayjob_runs_the_job_file_and_resumes_from_its_report(tmp_path):
    out = _render(tmp_path, "inference")
    base = _base(out)
    job = base["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert (
        job["ttlSecondsAfterFinished"] > 0 and job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
    )
    words = shlex.split(job["entrypoint"])
    assert words[:5] == ["python", "-m", "totask_ray", "run", f"{JOB_MOUNT}/job.yaml"]
    # the run, not a shell, checks that the report is there: it may live on a volume or in a bucket
    report = words[words.index("--report") + 1]
    assert report.startswith(f"{REPORT_MOUNT}/") and report.endswith(".jsonl")
    assert words[words.index("--resume") + 1] == report and "--resume-if-exists" in words
    config_map = base["ConfigMap"]
    assert config_map["data"]["job.yaml"] == (tmp_path / "job-inference.yaml").read_text()
    assert config_map["data"]["release-34.yaml"] == (FACES / "config.yaml").read_text()
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {v["name"] for v in head["volumes"]} == {"job", "reports"}
    assert "volumes" not in base["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}, "nothing is installed at pod start and no credential travels"
    if shutil.which("kubectl"):
        warm = _by_kind(_built(out, "warm"))
        assert warm["RayJob"]["spec"]["clusterSelector"] == {m.CLUSTER_LABEL: "totask"}
        warm_head = warm["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
        assert {v["name"] for v in warm_head["volumes"]} == {"job", "reports"}


def test_label_studio_jobs_read_the_release_from_the_config_map(tmp_path):
    base = _base(_render(tmp_path, "inference", "--platform", "label-studio"))
    assert f"--release 34={JOB_MOUNT}/release-34.yaml" in base["RayJob"]["spec"]["entrypoint"]
    secret = _docs(tmp_path / "out-inference" / "secret.example.yaml")[0]
    assert secret["stringData"] == {"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""}


def test_the_rayservice_embeds_what_serve_config_prints_and_serve_accepts(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    service = _base(_render(tmp_path, "inference"))["RayService"]
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    parsed = ServeDeploySchema.model_validate(embedded)
    (app_,) = parsed.applications
    release = PreProcessorRelease.from_config(load_release_config(FACES))
    assert (app_.name, app_.route_prefix, app_.import_path) == (
        release.app_name,
        release.route_prefix,
        "serve_apps.faces.app:build_app",
    )
    assert app_.args["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    printed = runner.invoke(app, ["serve", "config", str(FACES)])
    assert printed.exit_code == 0, printed.output
    assert yaml.safe_load(printed.output) == embedded


def test_the_image_is_the_pinned_ray_and_python(tmp_path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if re.match(r"ray\[", d))
    ray_version = re.search(r"~=\s*([\d.]+)", ray_pin).group(1)
    python = re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups()
    dockerfile = (_render(tmp_path, "file") / "Dockerfile").read_text()
    (line,) = [ln for ln in dockerfile.splitlines() if ln.startswith("FROM ")]
    assert line == f"FROM rayproject/ray:{ray_version}-py{''.join(python)}${{VARIANT}}"
    assert '[models]"' in dockerfile and "pip install" in dockerfile


def test_no_token_in_any_rendered_file_or_runtime_env(tmp_path, monkeypatch):
    for var in ("SYNAPSE_ACCESS_TOKEN", "LABEL_STUDIO_API_KEY", "SYNAPSE_PLUGIN_RUN_USER_TOKEN"):
        monkeypatch.setenv(var, TOKEN)  # a shell where the user's token is set
    for method in ("file", "inference"):
        out = _render(tmp_path, method)
        files = [p for p in out.rglob("*") if p.is_file()]
        leaks = [str(p) for p in files if TOKEN in p.read_text()]
        assert leaks == [], f"the token leaked into {leaks}"
        assert TOKEN not in _base(out)["RayJob"]["spec"]["runtimeEnvYAML"]
        secret = _docs(out / "secret.example.yaml")[0]
        assert secret["stringData"] == {
            "SYNAPSE_HOST": "",
            "SYNAPSE_ACCESS_TOKEN": "",
            "SYNAPSE_PLUGIN_RUN_TENANT": "",
        }
        assert "Secret" not in {d["kind"] for d in _base(out).values()}, "the base never applies a Secret"


def test_render_refuses_what_it_cannot_render(tmp_path):
    with pytest.raises(RenderError, match=r"--release 34=path/to/config.yaml"):
        read_job(_job(tmp_path, "inference"), [])
    with pytest.raises(RenderError, match="is a file job and uses no release"):
        read_job(_job(tmp_path, "file"), [f"34={FACES}"])
    with pytest.raises(RenderError, match=r"ID=path/to/config\.yaml"):
        read_job(_job(tmp_path, "file"), ["faces"])
    out = tmp_path / "never"
    bad = runner.invoke(
        app, ["kube", "render", str(_job(tmp_path, "inference")), "--image", "x", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "--release 34=" in bad.output and not out.exists()
    with pytest.raises(ValueError, match="no spaces"):
        KubeOptions(image="has space")


def test_a_release_whose_app_is_not_installed_here_is_refused_by_both_commands(tmp_path):
    """`serve config` and `kube render` import the app to describe it: where its package is not
    installed, both exit 2 with the same words, naming what to do."""
    release = tmp_path / "release"
    release.mkdir()
    text = (
        (FACES / "config.yaml")
        .read_text()
        .replace("serve_apps.faces.app:build_app", "not_here.app:build_app")
    )
    (release / "config.yaml").write_text(text)
    printed = runner.invoke(app, ["serve", "config", str(release)])
    rendered = runner.invoke(app, ["kube", "render", str(_job(tmp_path, "inference", pre_processor=34)),
                                   "--image", "x", "--out", str(tmp_path / "out"), "--release", f"34={release}"])  # fmt: skip
    for got, verb in ((printed, "run this"), (rendered, "render")):
        assert got.exit_code == 2, got.output
        assert "the release's entrypoint cannot be imported here (ModuleNotFoundError" in got.output
        assert f"{verb} where the app's package is installed" in got.output


@pytest.mark.slow
def test_deploy_and_the_printed_config_describe_the_same_app(ray_cluster):
    """The normal path (`ensure_running`, as `serve deploy` and a run) deploys what `serve config`
    prints: the controller's record of the deployed app against the printed entry."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from totask_ray.serving.lifecycle import RayServeBackend, ensure_running

    config = faces_config("1.0.0-kube-drift")
    config["actions"]["deployment"]["serve_options"]["max_ongoing_requests"] = 12
    release = PreProcessorRelease.from_config(load_release_config_from(config))
    printed = serve_application(release).to_config()
    try:
        ensure_running(release, RayServeBackend(), timeout_s=120, check_capacity=False)
        details = _get_global_client().get_serve_details()["applications"][release.app_name]
    finally:
        serve.delete(release.app_name)
    assert details["route_prefix"] == printed["route_prefix"]
    (deployment,) = details["deployments"].values()
    deployed = deployment["deployment_config"]
    args = printed["args"]
    assert deployed["num_replicas"] == args["num_replicas"]
    assert deployed["max_ongoing_requests"] == args["max_ongoing_requests"] == 12
    for key, value in args["ray_actor_options"].items():
        assert deployed["ray_actor_options"][key] == value, key


def load_release_config_from(data: dict) -> Any:
    from totask_ray.serving.config import parse_release_config

    return parse_release_config(data)


def _materialize(config_map: dict, where: Path) -> None:
    """The ConfigMap's files as its volume shows them to the head pod."""
    where.mkdir(parents=True, exist_ok=True)
    for name, text in config_map["data"].items():
        (where / name).write_text(text)


def _submit(head, base: dict[str, dict], etc: Path, reports: Path, env: dict) -> subprocess.CompletedProcess:
    """What KubeRay's submitter runs: `ray job submit --runtime-env-json ... -- ENTRYPOINT`, the
    entrypoint split by a shell; the mount paths point at where this test put the volumes."""
    spec = base["RayJob"]["spec"]
    entrypoint = spec["entrypoint"].replace(JOB_MOUNT, str(etc)).replace(REPORT_MOUNT, str(reports))
    runtime_env = json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]))
    return job_submit(
        head, ["--runtime-env-json", runtime_env, "--", *shlex.split(entrypoint)], env, timeout=120
    )


@pytest.mark.slow
def test_rendered_serve_config_and_rayjob_run_on_a_ray_start_cluster(platform, tmp_path):
    from totask_ray.embedded.seeds import write_sample_images

    # an inference project and its release, as the platform holds them
    store = platform.store
    version = "1.0.0-kube"
    release_id = store.create_plugin_release("faces", version, faces_config(version))
    (tmp_path / "faces.yaml").write_text(yaml.safe_dump(faces_config(version)))
    images = write_sample_images(platform.media_dir)
    dc = store.create_data_collection("kube", [{"name": "image_1", "is_primary": True}])
    inference_project = store.create_project("kube inference", dc)
    inference_ids = store.create_tasks_bulk(
        inference_project,
        [
            {"data_unit": store.create_data_unit(dc, {"image_1": {"path": images[n]["path"]}})}
            for n in ("astronaut",)
        ],
    )
    units = [good_unit(platform, i, "kubejob") for i in range(12)]
    file_project, file_ids = make_project(platform, units)

    job = tmp_path / "job.yaml"  # one job file, rendered for each method
    job.write_text(yaml.safe_dump({"name": "Kube_Faces", "project": inference_project, "method": "inference",
                                   "pre_processor": release_id}))  # fmt: skip
    out = tmp_path / "out-inf"
    result = runner.invoke(app, ["kube", "render", str(job), "--image", "x", "--out", str(out),
                                 "--release", f"{release_id}={tmp_path / 'faces.yaml'}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    inference = _base(out)
    file_job = tmp_path / "file-job.yaml"
    file_job.write_text(yaml.safe_dump({"name": "Kube_Files", "project": file_project,
                                        "target_specification_name": "annotation_data"}))  # fmt: skip
    files = _base(_render(tmp_path, "file", job=file_job))

    serve_port = quiet_port()
    config = yaml.safe_load(inference["RayService"]["spec"]["serveConfigV2"])
    config["http_options"] = {"host": "127.0.0.1", "port": serve_port}  # this machine's port, not 8000
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    # the head's environment: what envFrom gives the pods (token auth on, as the other `ray start` tests)
    env = cli_env(platform, RAY_AUTH_MODE="token")
    app_name = f"faces@{version}"
    with ray_head(env, "kube") as head:
        deploy = subprocess.run([str(BIN / "serve"), "deploy", str(config_file), "--address", head.dashboard],
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert deploy.returncode == 0, deploy.stderr[-2000:]

        def running() -> bool:
            proc = subprocess.run([str(BIN / "serve"), "status", "--address", head.dashboard],
                                  env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
            status = yaml.safe_load(proc.stdout) or {}
            app_status = (status.get("applications") or {}).get(app_name, {}).get("status")
            assert app_status not in ("DEPLOY_FAILED", "UNHEALTHY"), proc.stdout
            return app_status == "RUNNING"

        wait_until(
            running, f"{app_name} RUNNING after `serve deploy` of the rendered config", 180, interval=1
        )

        etc, reports = tmp_path / "etc-inf", tmp_path / "reports"
        _materialize(inference["ConfigMap"], etc)
        submit = _submit(head, inference, etc, reports, env)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert f"{app_name} is already running; not redeploying" in submit.stdout + submit.stderr
        assert "1 succeeded, 0 failed" in submit.stdout
        annotated = store.get_task(inference_ids[0])["data"]
        assert annotated and annotated.get("objects"), annotated  # the app answered with faces

        etc_files = tmp_path / "etc-files"
        _materialize(files["ConfigMap"], etc_files)
        first = _submit(head, files, etc_files, reports, env)
        assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
        assert "12 succeeded, 0 failed" in first.stdout
        # a retry (the RayJob's backoffLimit, or the manifest applied again) finds the report: resumes
        again = _submit(head, files, etc_files, reports, env)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        assert "resuming: 12 task(s) already done" in again.stdout + again.stderr, again.stderr[-2000:]
        tokens = first.stdout + first.stderr + again.stdout + again.stderr + submit.stdout + submit.stderr
        assert platform.token not in tokens
    for tid, unit in zip(file_ids, units, strict=True):
        assert store.get_task(tid)["data"] == unit["expected"]
    assert set(store.history_counts(task_ids=file_ids).values()) == {1}, "a resumed run wrote a task twice"
    assert sorted(read_report(reports / "kube-files.jsonl")) == sorted(file_ids)
