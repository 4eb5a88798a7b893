"""The tree ``totask-ray kube render`` writes: a kustomize base, three overlays, a Dockerfile.

```
OUT/
  Dockerfile                 rayproject/ray:<pinned ray>-py<python>, the wheel with [models]
  secret.example.yaml        the Secret's keys, no values (not applied by kustomize)
  base/                      RayCluster (warm), RayJob (own cluster), RayService (inference jobs),
                             the job's ConfigMap, the reports' PersistentVolumeClaim
  overlays/cpu/              no GPU group anywhere (a cluster without GPUs)
  overlays/gpu/              the GPU group tolerates GPU nodes' taint
  overlays/warm/             the RayJob runs on the warm RayCluster (clusterSelector) instead
```
Overlays patch the base with JSON patches (RFC 6902): KubeRay's objects are custom resources, for
which kustomize has no strategic-merge schema, and a JSON patch says exactly what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from totask_ray.kube import manifests as m
from totask_ray.kube import pins
from totask_ray.kube.inputs import JobInput
from totask_ray.kube.options import KubeOptions

DOCKERFILE = """\
# Built for totask-ray by `totask-ray kube render`. Build it from a folder holding the wheel:
#   pip wheel --no-deps -w dist .          # in the totask-ray checkout (or download the wheel)
#   docker build -f {out}/Dockerfile -t IMAGE .
#   docker build -f {out}/Dockerfile --build-arg VARIANT=-gpu -t IMAGE-gpu .   # CUDA, for GPU pods
# Everything is installed here: a pod installs nothing when it starts (no runtime_env pip).
ARG VARIANT=""
FROM {ray_image}${{VARIANT}}
COPY dist/totask_ray-*.whl /tmp/wheels/
RUN pip install --no-cache-dir "$(ls /tmp/wheels/totask_ray-*.whl)[models]" \\
 && rm -rf /tmp/wheels \\
 && python -c "import ray, totask_ray, serve_apps; assert ray.__version__ == '{ray}', ray.__version__"
"""


def _paths(kind: str) -> dict[str, str]:
    """Where each kind keeps its RayClusterSpec (JSON pointer)."""
    return {"RayCluster": "/spec", "RayJob": "/spec/rayClusterSpec", "RayService": "/spec/rayClusterConfig"}[
        kind
    ]


@dataclass
class Tree:
    """The rendered files: relative path -> text (YAML documents as mappings until written)."""

    files: dict[str, Any] = field(default_factory=dict)

    def add(self, path: str, content: Any) -> None:
        self.files[path] = content

    def write(self, out: Path) -> list[Path]:
        written = []
        for rel, content in sorted(self.files.items()):
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            text = (
                content if isinstance(content, str) else yaml.dump(content, Dumper=_Dumper, sort_keys=False)
            )
            path.write_text(text, encoding="utf-8")
            written.append(path)
        return written


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a RayService's serveConfigV2, a RayJob's runtimeEnvYAML, a patch) as
    literal blocks, which a person reads as the YAML they hold; the values are the same strings."""


def _block_strings(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _block_strings)


def _patch(kind: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {"target": {"group": "ray.io", "version": "v1", "kind": kind, "name": name},
            "patch": yaml.safe_dump(ops, sort_keys=False)}  # fmt: skip


def _kinds(job: JobInput, opts: KubeOptions) -> list[tuple[str, str]]:
    kinds = [("RayCluster", opts.cluster_name), ("RayJob", m.job_name(job))]
    if job.release is not None:
        kinds.append(("RayService", m.ray_service(job, opts)["metadata"]["name"]))
    return kinds


def overlays(job: JobInput, opts: KubeOptions) -> dict[str, dict[str, Any]]:
    """The three overlays' kustomization.yaml, by name."""
    cpu = [
        _patch(kind, name, [{"op": "remove", "path": f"{_paths(kind)}/workerGroupSpecs/{m.GPU_INDEX}"}])
        for kind, name in _kinds(job, opts)
    ]
    toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    gpu = [
        _patch(kind, name, [{
            "op": "add",
            "path": f"{_paths(kind)}/workerGroupSpecs/{m.GPU_INDEX}/template/spec/tolerations",
            "value": toleration,
        }])
        for kind, name in _kinds(job, opts)
    ]  # fmt: skip
    volumes, mounts = m.job_volumes(job, opts)
    # clusterSelector mode: KubeRay refuses backoffLimit there, and a cluster it did not create is
    # neither shut down nor given a TTL; applying the RayJob again resumes from the report.
    warm = [
        _patch("RayJob", m.job_name(job), [
            {"op": "remove", "path": "/spec/rayClusterSpec"},
            {"op": "remove", "path": "/spec/backoffLimit"},
            {"op": "remove", "path": "/spec/ttlSecondsAfterFinished"},
            {"op": "replace", "path": "/spec/shutdownAfterJobFinishes", "value": False},
            {"op": "add", "path": "/spec/clusterSelector", "value": {m.CLUSTER_LABEL: opts.cluster_name}},
        ]),
        _patch("RayCluster", opts.cluster_name, [
            {"op": "add", "path": "/spec/headGroupSpec/template/spec/volumes", "value": volumes},
            {"op": "add", "path": "/spec/headGroupSpec/template/spec/containers/0/volumeMounts",
             "value": mounts},
        ]),
    ]  # fmt: skip
    out = {}
    for name, patches in (("cpu", cpu), ("gpu", gpu), ("warm", warm)):
        out[name] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../base"],
            "patches": patches,
        }
    return out


def secret_keys(platform: str) -> list[str]:
    """The variables the run reads for ``platform``: its CLI options' environment names."""
    from totask_ray.platform.connect import KINDS

    kind = next(k for k in KINDS if k.name == platform)
    return [o.env for o in kind.options if o.env]


def render(job: JobInput, opts: KubeOptions, *, out_label: str = "OUT") -> Tree:
    """Every file of the tree (nothing is written: see :meth:`Tree.write`)."""
    tree = Tree()
    base = {
        "raycluster.yaml": m.ray_cluster(job, opts),
        "rayjob.yaml": m.ray_job(job, opts),
        "job-configmap.yaml": m.job_config_map(job),
        "reports-pvc.yaml": m.reports_claim(opts),
    }
    if job.release is not None:
        base["rayservice.yaml"] = m.ray_service(job, opts)
    for name, manifest in base.items():
        tree.add(f"base/{name}", manifest)
    tree.add(
        "base/kustomization.yaml",
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": sorted(base)},
    )
    for name, kustomization in overlays(job, opts).items():
        tree.add(f"overlays/{name}/kustomization.yaml", kustomization)
    tree.add("secret.example.yaml", m.secret_example(opts, secret_keys(opts.platform)))
    tree.add(
        "Dockerfile",
        DOCKERFILE.format(out=out_label, ray_image=pins.ray_image(), ray=pins.ray_version()),
    )
    return tree
