"""What a bench process runs in: the repository root, an environment scrubbed before anything
imports ray (no usage reporting, no stray cluster, no Data progress bars, no platform credentials),
the environment of the processes a bench spawns, and a free loopback port.

Every bench helper that leads to ray (local_ray, meters, local_platform, public_sdk) imports this
module first, so importing any of them scrubs the environment before ray is imported.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# Before anything imports ray: no usage reporting, no stray cluster, no Data progress bars.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
for _var in (
    "SYNAPSE_HOST",
    "SYNAPSE_ACCESS_TOKEN",
    "SYNAPSE_PLUGIN_RUN_USER_TOKEN",
    "SYNAPSE_PLUGIN_RUN_TENANT",
):
    os.environ.pop(_var, None)

ROOT = Path(__file__).resolve().parents[1]


def env_for_children() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (never all interfaces)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
