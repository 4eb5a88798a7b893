"""Reaching Ray: the cluster the caller chose, or a fresh local one.

Both the driver (before annotating) and the inference method (before deploying) need a cluster;
this is the one place that decides which.
"""

from __future__ import annotations

import logging
import os
from typing import Any


def ensure_ray(address: str | None = None, *, verbose: bool = False) -> bool:
    """Connect to a cluster (address or RAY_ADDRESS) or start a local one; True if we started it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if not verbose:
        # Ray's notices for cluster operators, not for someone running a job: the token-auth notice
        # (a Python logger) and the core worker's "constructor arguments in the object store"
        # line, which Ray Data's own actors trigger on every run (C++, only silenced below error).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "configure_logging": verbose}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, **kwargs)
        return False
    # "local": start a fresh cluster; a bare ray.init() would attach to whatever `ray start` left running.
    ray.init(address="local", include_dashboard=False, **kwargs)
    global _started_local
    _started_local = True
    return True


_started_local = False


def shutdown_if_started() -> None:
    """Stop the local cluster `ensure_ray` started in this process, if it did (the CLI, at exit)."""
    global _started_local
    if _started_local:
        import ray

        ray.shutdown()
        _started_local = False
