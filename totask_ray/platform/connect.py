"""The one place that turns platform settings into a client.

Everything above `platform/` holds a `PlatformConfig` (picklable, so Ray workers get a copy) and
asks here for a client; adding a platform means a new config type and a new branch here.
"""

from __future__ import annotations

from typing import TypeAlias

from totask_ray.platform.base import AsyncPlatform, Platform
from totask_ray.platform.synapse.client import AsyncSynapseClient, SynapseClient, SynapseConfig

PlatformConfig: TypeAlias = SynapseConfig


def connect(config: PlatformConfig) -> Platform:
    """A blocking client (the driver, the id source's read tasks)."""
    return SynapseClient(config)


def connect_async(config: PlatformConfig) -> AsyncPlatform:
    """An async client for one annotator actor; its session is made on the loop that first uses it."""
    return AsyncSynapseClient(config)


def config_from_env() -> PlatformConfig:
    """The platform named by the environment: the SYNAPSE_* variables the Synapse SDK reads."""
    return SynapseConfig.from_env()
