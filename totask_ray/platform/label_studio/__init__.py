"""Label Studio as a platform: the same protocols as Synapse (`totask_ray.platform.base`)."""

from totask_ray.platform.label_studio.client import AsyncLabelStudioClient, LabelStudioClient
from totask_ray.platform.label_studio.config import LabelStudioConfig, WriteAs

__all__ = ["AsyncLabelStudioClient", "LabelStudioClient", "LabelStudioConfig", "WriteAs"]
