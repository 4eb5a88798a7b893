"""The local Ray a bench runs on, and Ray Serve on loopback."""

from __future__ import annotations

import os
import time

from bench.environment import free_port

# -- Ray --------------------------------------------------------------------------------------------


def start_ray(num_cpus: int | None = None) -> float:
    """Start a local Ray in this process (no dashboard, loopback Serve later); seconds taken."""
    import ray

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    )
    return time.perf_counter() - t0


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def start_serve_loopback() -> int:
    """Serve with its HTTP proxy on 127.0.0.1 and a free port (never all interfaces)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port
