"""One run, one spec: what to do (`ToTaskParams`), how (`RunOptions`), where (the platform's
config) and with which plugin (`action_cls`).

`run_to_task` builds the spec once and hands that same object to the method, the pipeline and
every annotator actor (frozen and picklable: Ray ships it to each actor once), so an option is
read where it acts, under its one name, and none is copied field by field into another holder.
`ToTaskParams` stays exactly the Synapse action's contract; `RunOptions` says how to run it here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from totask_ray.action import ToTask
from totask_ray.ledger.record import LedgerSpec
from totask_ray.net.downloads import DEFAULT_MAX_JSON_BYTES, UrlPolicy, allowed_host
from totask_ray.net.images import MAX_IMAGE_BYTES
from totask_ray.params import ToTaskParams
from totask_ray.platform.connect import PlatformConfig

if TYPE_CHECKING:
    from totask_ray.serving.node_types import NodeType


def _cli(flag: str) -> dict[str, str]:
    return {"cli": flag}


class RunOptions(BaseModel):
    """How to run (not what to do: that is `ToTaskParams`). Each field is a keyword of `run_to_task`;
    its description is its documentation, and a field with a `cli` flag is a `totask-ray run` option."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report: str | None = Field(
        json_schema_extra=_cli("report"),
        default=None,
        description="Write one JSON line per task outcome here: a path, or an object-store URI "
        "(s3://bucket/key, or any URI pyarrow or fsspec resolves; credentials from the environment, "
        "e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).",
    )
    ledger: str | None = Field(
        json_schema_extra=_cli("ledger"),
        default=None,
        description="Where the run's ledger goes (what each write changed, for `totask-ray undo` and "
        "`diff`): a directory holding one directory per run, or an object-store URI as for --report "
        "(default: <report>.ledger/ beside --report, else ./totask-ledgers/).",
    )
    no_ledger: bool = Field(
        json_schema_extra=_cli("no-ledger"),
        default=False,
        description="Keep no ledger: the run cannot be undone by `totask-ray undo`.",
    )
    job_id: int | None = Field(
        json_schema_extra=_cli("job-id"),
        default=None,
        description="The platform's job record to report status, progress and result to.",
    )
    create_job: bool = Field(default=False, description="Create a job record on the platform for this run.")
    dry_run: bool = Field(
        json_schema_extra=_cli("dry-run"),
        default=False,
        description="Do everything except writing; the report shows what would be written.",
    )
    resume: str | None = Field(
        json_schema_extra=_cli("resume"),
        default=None,
        description="Skip the tasks that succeeded (or were skipped) in this earlier report (a path or URI).",
    )
    resume_if_exists: bool = Field(
        json_schema_extra=_cli("resume-if-exists"),
        default=False,
        description="With --resume: a report not there yet is no error, the run starts from the first task "
        "(a job that is retried with --report and --resume on the same report).",
    )
    ray_address: str | None = Field(
        json_schema_extra=_cli("address"),
        default=None,
        description="Ray cluster to use (default: RAY_ADDRESS, else the one running on this machine; "
        "`local` starts a fresh one).",
    )
    cluster_yaml: Path | None = Field(
        json_schema_extra=_cli("cluster-yaml"),
        default=None,
        description="The cluster's node types (a `ray up` config or a KubeRay RayCluster), when the cluster "
        "cannot say: pools and replicas are sized on what its autoscaler can add.",
    )
    num_actors: int | None = Field(
        json_schema_extra=_cli("num-actors"),
        default=None,
        ge=1,
        description="A fixed number of annotator actors (default: start with one and grow with the work, "
        "up to what the cluster holds once grown).",
    )
    max_actors: int | None = Field(
        json_schema_extra=_cli("max-actors"),
        default=None,
        ge=1,
        description="The most annotator actors the pool may grow to (on a shared cluster).",
    )
    actor_cpus: float = Field(default=0.5, gt=0, description="CPUs each annotator actor reserves.")
    concurrency: int = Field(
        json_schema_extra=_cli("concurrency"),
        default=32,
        ge=1,
        le=1024,
        description="Tasks in flight per annotator actor.",
    )
    hook_threads: int = Field(
        default=8, ge=1, description="Threads per actor for plugin hooks that are plain functions."
    )
    progress_bar: bool | None = Field(
        default=None, description="Show a progress bar (default: when stderr is a terminal or notebook)."
    )
    no_progress_timeout_s: float = Field(
        default=300.0, gt=0, description="Fail the run when no task finishes for this long."
    )
    allowed_hosts: list[str] = Field(
        json_schema_extra=_cli("allow-host"),
        default_factory=list,
        description="A private host file URLs may point at besides the platform's own: `host` (every port) "
        "or `host:port`; repeat for more.",
    )
    allow_private_urls: bool = Field(
        default=False, description="Allow file URLs on any private or loopback address (trusted networks)."
    )
    max_json_bytes: int = Field(
        default=DEFAULT_MAX_JSON_BYTES, gt=0, description="Largest annotation JSON to download."
    )
    max_image_bytes: int = Field(default=MAX_IMAGE_BYTES, gt=0, description="Largest image to download.")
    download_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one file download.")
    page_size: int = Field(default=500, ge=1, le=1000, description="Task ids per listing page.")
    verbose_ray: bool = Field(
        json_schema_extra=_cli("verbose"),
        default=False,
        description="Show Ray's own logs and Ray Data's progress.",
    )
    stop_timeout_s: float = Field(
        json_schema_extra=_cli("stop-timeout"),
        default=30.0,
        gt=0,
        description="On SIGINT/SIGTERM, how long the tasks in flight may take to finish.",
    )
    serve_poll_interval_s: float = Field(
        default=1.0, gt=0, description="inference: how often to poll a pre-processor that is starting."
    )
    serve_ready_timeout_s: float = Field(
        default=180.0, gt=0, description="inference: how long a pre-processor may take to become ready."
    )
    node_boot_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="inference: how much longer the readiness wait allows when the autoscaler must add a node.",
    )
    keep_warm: bool = Field(
        json_schema_extra=_cli("keep-warm"),
        default=False,
        description="inference: keep the replicas this run planned after it ends (default: they scale down "
        "to the release's minimum once idle, so the cluster can release their nodes).",
    )
    scale_down_delay_s: float = Field(
        default=60.0,
        ge=0,
        description="inference: how long planned replicas stay idle before they scale down.",
    )
    inference_call_timeout_s: float = Field(
        default=120.0, gt=0, description="inference: how long one batch call to the pre-processor may take."
    )
    projected_s: float | None = Field(
        json_schema_extra=_cli("projected-s"),
        default=None,
        gt=0,
        description="The wall time `totask-ray preview` projected for this job: the run ends by printing "
        "what it achieved against it.",
    )
    inference_convention: Literal["batched", "synapse"] | None = Field(
        default=None,
        description="inference: how to call the pre-processor (batched predict, or one Synapse request per "
        "task); default: as its release says.",
    )

    def declared_node_types(self) -> list[NodeType] | None:
        """The node types `--cluster-yaml` declares (None without it), for every sizing of the run."""
        if self.cluster_yaml is None:
            return None
        from totask_ray.serving.node_types import node_types_from_cluster_yaml

        return node_types_from_cluster_yaml(self.cluster_yaml)

    @field_validator("report", "resume", "ledger", mode="before")
    @classmethod
    def _location(cls, value: object) -> object:
        # a path as a `Path` or a string; a URI stays a string (a `Path` would fold its `//`)
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _resume_if_exists_needs_resume(self) -> RunOptions:
        if self.resume_if_exists and self.resume is None:
            raise ValueError("resume_if_exists needs resume: the report to resume from when it exists")
        return self

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return [] if value is None else value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        # a value the allow-list cannot use is refused, never kept to match nothing
        return [allowed_host(h) for h in hosts]


@dataclass(frozen=True)
class RunSpec:
    """Everything a run was asked: the params, the options, the platform and the plugin class."""

    params: ToTaskParams
    options: RunOptions
    platform: PlatformConfig
    action_cls: type[ToTask] = ToTask
    ledger: LedgerSpec | None = None  # the run's ledger, once the annotate step created it

    @property
    def url_policy(self) -> UrlPolicy:
        """The hosts file URLs may point at: the platform's own and the ones the options allow."""
        o = self.options
        return UrlPolicy.for_platform(self.platform.host, o.allowed_hosts, o.allow_private_urls)


def cli_flags() -> dict[str, str]:
    """The `RunOptions` fields `totask-ray run` takes, by field name: their `cli` flag."""
    out = {}
    for name, field in RunOptions.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and isinstance(extra.get("cli"), str):
            out[name] = str(extra["cli"])
    return out


def documented_options() -> str:
    """The options as `run_to_task`'s docstring lists them: one line per field, from its description."""
    lines = []
    for name, field in RunOptions.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"      {name} (default {default!r}): {field.description}")
    return "\n".join(lines)
