"""Reaching Ray: the cluster the caller chose, the one running on this machine, or a fresh one.

Both the driver (before annotating) and the inference method (before deploying) need a cluster;
this is the one place that decides which. A driver on the head of a running cluster (a notebook or
a shell on the head) joins that cluster rather than quietly starting a second, one-node cluster
beside it; `--address local` asks for a fresh one explicitly.
"""

from __future__ import annotations

import logging
import os
from typing import Any


def ensure_ray(address: str | None = None, *, verbose: bool = False) -> bool:
    """Connect to a cluster (``address``, else RAY_ADDRESS, else the one `ray start` runs on this
    machine) or start a fresh local one (none of those, or ``local``); True if we started it."""
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
    target = address or os.environ.get("RAY_ADDRESS") or running_here()
    if target and target != "local":
        ray.init(address=target, **kwargs)
        return False
    # "local": start a fresh cluster; a bare ray.init() would attach to whatever `ray start` left running.
    ray.init(address="local", include_dashboard=False, **kwargs)
    global _started_local
    _started_local = True
    return True


_started_local = False
log = logging.getLogger("totask_ray")


def running_here() -> str | None:
    """The cluster `ray start` last started on this machine, if its GCS still runs (Ray's own
    address file can outlive the cluster)."""
    from ray._private import services

    address = services.find_bootstrap_address(None)
    if address and address in services.find_gcs_addresses():
        log.info(
            "joining the Ray cluster running on this machine at %s (--address local starts a fresh one)",
            address,
        )
        return str(address)
    return None


def shutdown_if_started() -> None:
    """Stop the local cluster `ensure_ray` started in this process, if it did (the CLI, at exit)."""
    global _started_local
    if _started_local:
        import ray

        ray.shutdown()
        _started_local = False
