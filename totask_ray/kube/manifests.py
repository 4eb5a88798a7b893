"""The Kubernetes objects of a render, as plain mappings (``render.py`` writes them as YAML).

One cluster spec serves the warm RayCluster, the RayJob's own cluster and the RayService's cluster:
a head that offers Ray no CPU (``num-cpus: "0"``: the driver, the Serve controller and Ray Data's
coordination live there, and no annotator or replica lands on it), a CPU group and a GPU group that
both scale from zero under KubeRay's in-tree autoscaler, idle workers released after a timeout.
A GPU pod's ``nvidia.com/gpu`` limit and its ``num-gpus`` are one number, so Ray never offers a
GPU the pod lacks. Every Ray container gets the platform's credentials from a Secret (``envFrom``):
they never appear in a manifest, and never in ``runtimeEnvYAML`` (which ``ray job`` shows to anyone).

The RayJob's entrypoint is ``python -m totask_ray run`` on the job file from a ConfigMap, writing its
report on a volume that outlives the pod; when a report is already there (a retry after the head
died, or the RayJob applied again) it resumes from it: nothing is written twice, nothing is lost.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from totask_ray.kube import pins
from totask_ray.kube.inputs import JobInput
from totask_ray.kube.options import JOB_MOUNT, REPORT_MOUNT, KubeOptions, Pool, k8s_name
from totask_ray.serving.application import serve_application, serve_config

RAY_API = "ray.io/v1"
CPU_GROUP, GPU_GROUP = "cpu-workers", "gpu-workers"
GPU_INDEX = 1  # cluster_spec lists the CPU group, then the GPU group
CLUSTER_LABEL = "ray.io/cluster"  # what a RayJob's clusterSelector names a RayCluster by
JOB_FILE = "job.yaml"
# The job's runtime env: nothing to install (the image has it all) and no credential (envFrom).
RUNTIME_ENV = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}}

Manifest = dict[str, Any]


def job_name(job: JobInput) -> str:
    return k8s_name(job.params.name)


def _meta(name: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/part-of": "totask-ray", **labels}}


def _container(name: str, image: str, cpus: str, memory: str, gpus: int, opts: KubeOptions) -> dict:
    limits: dict[str, str] = {"cpu": cpus, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {
        "name": name,
        "image": image,
        "resources": {"limits": limits, "requests": dict(limits)},
        "envFrom": [{"secretRef": {"name": opts.secret_name}}],
    }


def job_volumes(job: JobInput, opts: KubeOptions) -> tuple[list[dict], list[dict]]:
    """(the head's volumes, its container's mounts): the job's ConfigMap and the reports' claim.

    Only the cluster that runs the job mounts them (the RayJob's own, or the warm one in the warm
    overlay): the claim is ReadWriteOnce, which pods on two nodes cannot share.
    """
    mounts = [
        {"name": "job", "mountPath": JOB_MOUNT, "readOnly": True},
        {"name": "reports", "mountPath": REPORT_MOUNT},
    ]
    volumes = [
        {"name": "job", "configMap": {"name": config_map_name(job)}},
        {"name": "reports", "persistentVolumeClaim": {"claimName": opts.reports_claim}},
    ]
    return volumes, mounts


def _head(job: JobInput, opts: KubeOptions, *, runs_job: bool) -> dict[str, Any]:
    container = _container("ray-head", opts.image, opts.head_cpus, opts.head_memory, 0, opts)
    container["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 8000, "name": "serve"},
    ]
    pod: dict[str, Any] = {"containers": [container]}
    if runs_job:
        pod["volumes"], container["volumeMounts"] = job_volumes(job, opts)
    return {
        # The head holds the driver, the Serve controller and Ray Data's coordination only.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"spec": pod},
    }


def _group(name: str, pool: Pool, image: str, opts: KubeOptions) -> dict[str, Any]:
    params = {"num-cpus": str(pool.cpus)}
    if pool.gpus:
        params["num-gpus"] = str(pool.gpus)  # = the pod's nvidia.com/gpu limit
    container = _container("ray-worker", image, str(pool.cpus), pool.memory, pool.gpus, opts)
    return {
        "groupName": name,
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": pool.max_replicas,
        "rayStartParams": params,
        "template": {"spec": {"containers": [container]}},
    }


def cluster_spec(job: JobInput, opts: KubeOptions, *, runs_job: bool = False) -> dict[str, Any]:
    """A RayClusterSpec: head without CPUs, CPU and GPU groups from zero, in-tree autoscaling;
    ``runs_job``: its head mounts the job file and the reports."""
    return {
        "rayVersion": pins.ray_version(),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"idleTimeoutSeconds": opts.idle_timeout_s, "upscalingMode": "Default"},
        "headGroupSpec": _head(job, opts, runs_job=runs_job),
        "workerGroupSpecs": [
            _group(CPU_GROUP, opts.cpu_pool, opts.image, opts),
            _group(GPU_GROUP, opts.gpu_pool, opts.gpu_image or opts.image, opts),
        ],
    }


def ray_cluster(job: JobInput, opts: KubeOptions) -> Manifest:
    """The warm cluster for shared use (notebooks, repeated jobs, the RayJob's selector variant)."""
    return {
        "apiVersion": RAY_API,
        "kind": "RayCluster",
        "metadata": _meta(opts.cluster_name),
        "spec": cluster_spec(job, opts),
    }


def config_map_name(job: JobInput) -> str:
    return f"{job_name(job)}-job"


def release_file(release_id: int) -> str:
    return f"release-{release_id}.yaml"


def job_config_map(job: JobInput) -> Manifest:
    """The job file as written (and, for an inference job, its release config) for the head pod."""
    data = {JOB_FILE: job.text}
    if job.release is not None:
        data[release_file(job.release.id)] = job.release.text
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(config_map_name(job)), "data": data}


def reports_claim(opts: KubeOptions) -> Manifest:
    """Where reports outlive the head pod: a retry's new cluster mounts the same claim."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(opts.reports_claim),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": opts.reports_size}}},
    }


def report_path(job: JobInput) -> str:
    return f"{REPORT_MOUNT}/{job_name(job)}.jsonl"


def entrypoint(job: JobInput, opts: KubeOptions) -> str:
    """``python -m totask_ray run`` on the mounted job file, resuming from its report when one is there.

    ``--report R --resume R --resume-if-exists``: the first try starts from the first task, a retry
    (after the head died, or the RayJob applied again) skips what an earlier try reported. The run
    itself checks whether R is there, not a shell, so the same entrypoint serves a report on a volume
    or on an object store (an ``s3://`` URI). The same location for ``--report`` and ``--resume`` is
    safe: the new report starts with what the earlier one held.
    """
    report = report_path(job)
    run = [
        "python", "-m", "totask_ray", "run", f"{JOB_MOUNT}/{JOB_FILE}", "--platform", opts.platform,
        "--report", report, "--resume", report, "--resume-if-exists",
    ]  # fmt: skip
    if opts.platform == "label-studio" and job.release is not None:
        # Label Studio keeps no releases: the run reads the config the ConfigMap carries.
        run += ["--release", f"{job.release.id}={JOB_MOUNT}/{release_file(job.release.id)}"]
    return shlex.join(run)


def ray_job(job: JobInput, opts: KubeOptions) -> Manifest:
    """One run on a cluster of its own, torn down after it; retried from the last report."""
    return {
        "apiVersion": RAY_API,
        "kind": "RayJob",
        "metadata": _meta(job_name(job)),
        "spec": {
            "entrypoint": entrypoint(job, opts),
            "runtimeEnvYAML": yaml.safe_dump(RUNTIME_ENV, sort_keys=True),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.ttl_after_finished_s,
            "activeDeadlineSeconds": opts.active_deadline_s,
            "backoffLimit": opts.backoff_limit,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": cluster_spec(job, opts, runs_job=True),
        },
    }


def serve_config_text(job: JobInput) -> str:
    """The Serve config (``serveConfigV2``) of the job's pre-processor, from the deploying code."""
    assert job.release is not None
    return yaml.safe_dump(serve_config(serve_application(job.release.release)), sort_keys=False)


def ray_service(job: JobInput, opts: KubeOptions) -> Manifest:
    """The job's pre-processor on Serve; a run against this cluster finds it RUNNING and only detects it."""
    assert job.release is not None
    return {
        "apiVersion": RAY_API,
        "kind": "RayService",
        "metadata": _meta(k8s_name(f"totask-{job.release.release.code}")),
        "spec": {"serveConfigV2": serve_config_text(job), "rayClusterConfig": cluster_spec(job, opts)},
    }


def secret_example(opts: KubeOptions, keys: list[str]) -> Manifest:
    """The Secret the pods read, with its keys and no values: fill them in, never commit them."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(opts.secret_name),
        "type": "Opaque",
        "stringData": dict.fromkeys(keys, ""),
    }
