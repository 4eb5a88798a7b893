"""The Synapse platform: its REST client and the settings that reach it."""

from totask_ray.platform.synapse.client import AsyncSynapseClient, SynapseClient, SynapseConfig

__all__ = ["AsyncSynapseClient", "SynapseClient", "SynapseConfig"]
