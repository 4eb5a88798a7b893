"""What a render may choose: the image, the pools, the run's deadlines, where its reports live.

Defaults follow cluster.yaml (a head with no CPU for work, a CPU pool, a GPU pool from zero, idle
nodes released after 10 minutes). Every field is checked here, so a manifest never carries a value
Kubernetes or KubeRay would refuse at apply time when it can be told now.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Kubernetes quantities as the manifests write them ("8", "500m", "32Gi").
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")]
Platform = Literal["synapse", "label-studio"]

# Where the pods see the job's files and the run's reports (mount paths, fixed).
JOB_MOUNT = "/etc/totask"
REPORT_MOUNT = "/var/lib/totask/reports"


class Pool(BaseModel):
    """One worker group: each pod's size, and how many the autoscaler may add (from zero)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: Annotated[int, Field(ge=1)] = 8
    memory: Quantity = "32Gi"
    gpus: Annotated[int, Field(ge=0)] = 0
    max_replicas: Annotated[int, Field(ge=0)] = 4


class KubeOptions(BaseModel):
    """A render's choices; see ``totask-ray kube render --help`` for each flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(min_length=1)
    gpu_image: str | None = None  # the GPU group's image (the -gpu build); the image when not given
    platform: Platform = "synapse"
    cluster_name: str = "totask"
    secret_name: str = "totask-platform"
    reports_claim: str = "totask-reports"
    reports_size: Quantity = "1Gi"
    head_cpus: Quantity = "2"
    head_memory: Quantity = "8Gi"
    cpu_pool: Pool = Pool()
    gpu_pool: Pool = Pool(cpus=8, memory="32Gi", gpus=1, max_replicas=2)
    idle_timeout_s: Annotated[int, Field(ge=0)] = 600
    active_deadline_s: Annotated[int, Field(ge=1)] = 6 * 3600
    ttl_after_finished_s: Annotated[int, Field(ge=0)] = 3600
    backoff_limit: Annotated[int, Field(ge=0)] = 2

    @field_validator("image", "gpu_image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c.isspace() for c in v)):
            raise ValueError("an image reference has no spaces, e.g. registry.example.com/totask:0.1.0")
        return v

    @field_validator("cluster_name", "secret_name", "reports_claim")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not DNS_1035.fullmatch(v) or len(v) > 47:
            raise ValueError(
                f"{v!r} is not a Kubernetes name: lower-case letters, digits and '-', "
                "starting with a letter, at most 47 characters"
            )
        return v


DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def k8s_name(text: str, *, limit: int = 47) -> str:
    """``Cli_Job`` -> ``cli-job``: a DNS-1035 label (what KubeRay requires of its objects' names)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = f"totask-{name}".rstrip("-")
    return name[:limit].rstrip("-")
