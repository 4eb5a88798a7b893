"""totask-ray: pre-annotate labeling tasks at cluster scale (Synapse ToTask on Ray Data and Ray Serve).

The public names are imported lazily, so the platform server and the CLI start without paying for
the driver's imports.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

# Nothing leaves this machine: Ray's usage reporting is off before ray is imported anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# httpx logs every request URL at INFO; file URLs are signed (a credential), so keep it at WARNING.
logging.getLogger("httpx").setLevel(logging.WARNING)

# What users touch: what a caller runs and catches, and what a plugin author implements.
_EXPORTS = {
    "ToTask": "totask_ray.action",
    "ToTaskError": "totask_ray.errors",
    "RunStopped": "totask_ray.errors",
    "run_to_task": "totask_ray.run.driver",
    "RunOptions": "totask_ray.pipeline.spec",
    "ParamsError": "totask_ray.params",
    "ToTaskParams": "totask_ray.params",
    "ToTaskResult": "totask_ray.result",
    "SynapseConfig": "totask_ray.platform.synapse",
    "LabelStudioConfig": "totask_ray.platform.label_studio",
    "PlatformError": "totask_ray.platform.errors",
    "Detection": "totask_ray.serving.interface",
    "PreProcessor": "totask_ray.serving.interface",
    "PreProcessorSpec": "totask_ray.serving.interface",
    "CommonParams": "totask_ray.serving.interface",
    "InferenceParams": "totask_ray.serving.interface",
    # the page of what a job would write on a sample (a callable package: `preview(job, sample=20)`)
    "preview": "totask_ray.preview",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'totask_ray' has no attribute {name!r}")
