"""totask-ray: pre-annotate labeling tasks at cluster scale (Synapse ToTask on Ray Data and Ray Serve)."""

from __future__ import annotations

import logging
import os

# Nothing leaves this machine: Ray's usage reporting is off before ray is imported anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# httpx logs every request URL at INFO; file URLs are signed (a credential), so keep it at WARNING.
logging.getLogger("httpx").setLevel(logging.WARNING)

from totask_ray.action import ToTask
from totask_ray.driver import ToTaskError, run_to_task
from totask_ray.params import ParamsError, ToTaskParams, ToTaskResult

__all__ = ["ParamsError", "ToTask", "ToTaskError", "ToTaskParams", "ToTaskResult", "run_to_task"]
__version__ = "0.1.0"
