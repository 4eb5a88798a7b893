"""Where a Label Studio server is, how to authenticate, and what a run writes there.

Picklable, so Ray workers get a copy; the key is a `SecretStr` and never shows in a repr, a log
line or an error message. Label Studio has no plugin releases: a pre-processor's release config
(the Synapse SDK's `config.yaml` shape) is given here, by id, so a job file keeps its
`pre_processor: <id>` unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator

from totask_ray.platform.cli_options import CliOption
from totask_ray.platform.errors import PlatformError
from totask_ray.platform.http import HttpSettings, settings_error

ENV_URL = "LABEL_STUDIO_URL"
ENV_KEY = "LABEL_STUDIO_API_KEY"


class WriteAs(StrEnum):
    """What a run writes to a Label Studio task."""

    PREDICTIONS = "predictions"  # the default: pre-annotations reviewers accept or fix
    ANNOTATIONS = "annotations"  # on request: counted as labeled work


class LabelStudioConfig(HttpSettings):
    EXAMPLE_HOST = "http://localhost:8080"
    ENV_HOST = ENV_URL

    api_key: SecretStr
    # predictions carry it; a task that already holds one of this version is skipped (resume)
    model_version: str | None = None
    write: WriteAs = WriteAs.PREDICTIONS
    # the run's project (set by the run): lets a worker read its tasks in chunks
    project: int | None = Field(default=None, gt=0)
    # pre-processor release configs by the id the job's `pre_processor` names
    releases: dict[int, dict[str, Any]] = Field(default_factory=dict)
    write_chunk: int = Field(default=500, ge=1, le=500)
    # a chunk goes once no prediction came for this long (or 10x this after the first)
    write_linger_s: float = Field(default=0.1, ge=0, le=5)
    # Label Studio's own defaults where they differ: its task reads are slower and it takes
    # bigger pages; SQLite behind it wants fewer connections
    read_timeout_s: float = Field(default=30.0, gt=0)
    page_size: int = Field(default=500, ge=1, le=5000)
    max_connections: int = Field(default=64, ge=1)

    @field_validator("model_version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> LabelStudioConfig:
        """LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token or a legacy key), as
        Label Studio's own SDK reads them; overrides win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {"host": env.get(ENV_URL), "api_key": env.get(ENV_KEY) or None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not values.get("host"):
            raise PlatformError(f"No Label Studio address: pass --host or set {ENV_URL}")
        if not values.get("api_key"):
            raise PlatformError(
                f"No Label Studio token: pass --token or set {ENV_KEY} (Account & Settings > Personal Access Token)"
            )
        try:
            return cls(**values)
        except ValidationError as exc:
            raise settings_error(exc, "Label Studio") from None

    def for_job(self, job_name: str, project: int | None = None) -> LabelStudioConfig:
        """The config a run uses: `model_version` is the job's name unless one was given, and the
        project is the job's."""
        return self.model_copy(update={"model_version": self.model_version or job_name, "project": project})

    @property
    def personal_token(self) -> bool:
        """A personal access token is a JWT (three dot-separated parts); a legacy key is not."""
        return self.api_key.get_secret_value().count(".") == 2

    def headers(self) -> dict[str, str]:
        h = super().headers()
        if not self.personal_token:
            h["Authorization"] = f"Token {self.api_key.get_secret_value()}"
        return h  # a personal token is traded for an access token first (`auth.py`)

    def secrets(self) -> list[str]:
        return [self.api_key.get_secret_value()]


def load_release_files(specs: list[str]) -> dict[int, dict[str, Any]]:
    """`ID=path/to/config.yaml` pairs (the CLI's `--release`) as release configs by id."""
    out: dict[int, dict[str, Any]] = {}
    for spec in specs:
        rid, sep, path = spec.partition("=")
        if not sep or not rid.strip().isdigit():
            raise PlatformError(
                f"--release takes ID=path/to/config.yaml, e.g. 789=plugin/config.yaml; got {spec!r}"
            )
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlatformError(f"release config {p} does not exist") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise PlatformError(f"release config {p} cannot be read as YAML ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise PlatformError(f"release config {p} must be a mapping (the plugin's config.yaml)")
        out[int(rid)] = data
    return out


CLI_OPTIONS = (
    CliOption("host", "host", "Platform URL", env=ENV_URL),
    CliOption("token", "api_key", "Access token; prefer the variable", env=ENV_KEY),
    CliOption("model-version", "model_version", "the predictions' model_version (default: the job's name)"),
    CliOption("write", "write", "write predictions (default) or annotations"),
    CliOption(
        "release", "releases", "a pre-processor release, ID=path/to/config.yaml (repeatable)",
        multiple=True, parse=load_release_files,
    ),
)  # fmt: skip
