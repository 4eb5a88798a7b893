"""The one place that turns platform settings into a client.

Everything above `platform/` holds a `PlatformConfig` (picklable, so Ray workers get a copy) and
asks here for a client; adding a platform means a new config type and a new branch here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeAlias

from totask_ray.platform.base import AsyncPlatform, Platform
from totask_ray.platform.errors import PlatformError
from totask_ray.platform.label_studio.client import AsyncLabelStudioClient, LabelStudioClient
from totask_ray.platform.label_studio.config import ENV_KEY, ENV_URL, LabelStudioConfig
from totask_ray.platform.synapse.client import AsyncSynapseClient, SynapseClient, SynapseConfig

PlatformConfig: TypeAlias = SynapseConfig | LabelStudioConfig
PLATFORMS = ("synapse", "label-studio")


def connect(config: PlatformConfig) -> Platform:
    """A blocking client (the driver, the id source's read tasks)."""
    if isinstance(config, LabelStudioConfig):
        return LabelStudioClient(config)
    return SynapseClient(config)


def connect_async(config: PlatformConfig) -> AsyncPlatform:
    """An async client for one annotator actor; its session is made on the loop that first uses it."""
    if isinstance(config, LabelStudioConfig):
        return AsyncLabelStudioClient(config)
    return AsyncSynapseClient(config)


def for_job(config: PlatformConfig, job_name: str, project: int | None = None) -> PlatformConfig:
    """The config a run uses (Label Studio: `model_version` defaults to the job's name)."""
    return config.for_job(job_name, project) if isinstance(config, LabelStudioConfig) else config


def platform_from_env(env: Mapping[str, str] | None = None) -> str:
    """`label-studio` when LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are set and SYNAPSE_HOST is not."""
    env = os.environ if env is None else env
    if env.get(ENV_URL) and env.get(ENV_KEY) and not env.get("SYNAPSE_HOST"):
        return "label-studio"
    return "synapse"


def config_from_env(
    platform: str | None = None, env: Mapping[str, str] | None = None, **overrides: object
) -> PlatformConfig:
    """The platform named by `platform` (or by the environment), from its own variables: the
    SYNAPSE_* ones the Synapse SDK reads, or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY."""
    name = platform or platform_from_env(env)
    if name == "label-studio":
        return LabelStudioConfig.from_env(env, **overrides)
    if name == "synapse":
        return SynapseConfig.from_env(env, **overrides)
    raise PlatformError(f"Unknown platform {name!r}: use one of {', '.join(PLATFORMS)}")
