"""Reaching Ray: the cluster the caller chose, or a fresh local one.

Both the driver (before annotating) and the inference method (before deploying) need a cluster;
this is the one place that decides which.
"""

from __future__ import annotations

import os
from typing import Any


def ensure_ray(address: str | None = None, *, verbose: bool = False) -> bool:
    """Connect to a cluster (address or RAY_ADDRESS) or start a local one; True if we started it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "configure_logging": verbose}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, **kwargs)
        return False
    # "local": start a fresh cluster; a bare ray.init() would attach to whatever `ray start` left running.
    ray.init(address="local", include_dashboard=False, **kwargs)
    return True
