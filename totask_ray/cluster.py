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
    # Workers' output reaches the driver (and so `ray job logs`): their warnings and errors, Python
    # warnings included. Not Serve's own components', which keep their logs in Serve's files.
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": verbose}
    target = address or os.environ.get("RAY_ADDRESS") or running_here()
    started = not (target and target != "local")
    if started:  # "local": a fresh cluster; a bare ray.init() would attach to what `ray start` left running
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        ray.init(address=target, **kwargs)
    if not verbose:
        _without_serve_components()
    global _started_local
    _started_local = _started_local or started
    return started


# Serve's controller, proxies and replicas: their INFO lines are for whoever runs the cluster, and
# they go to Serve's log files all the same.
SERVE_ACTORS = ("ServeController", "ProxyActor", "ServeReplica")
# What each new worker's raylet says of RAY_BACKEND_LOG_LEVEL (set above): an INFO line per worker.
LOG_LEVEL_NOTICE = "Set ray log level from environment variable"


def _without_serve_components() -> None:
    """Replace Ray's printer of workers' output with one that leaves out Serve's components (a
    run that starts Serve would otherwise print its controller's and proxy's INFO lines) and the
    raylet's notice of the log level, once per worker started."""
    import functools

    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)

    def print_unless_serve(data: dict[str, Any]) -> None:
        if str(data.get("actor_name") or "").startswith(SERVE_ACTORS):
            return
        lines = [line for line in data.get("lines", ()) if LOG_LEVEL_NOTICE not in line]
        if lines:
            printer({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_unless_serve)


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
