"""An autoscaling Ray cluster on this machine: Ray's fake multi-node provider, for tests and benches.

`fake_autoscaling_cluster({...node types...})` starts `ray start --head --autoscaling-config=...` with
`RAY_FAKE_CLUSTER=1`; the autoscaler (v1: v2 never schedules a GPU task here, measured on 2.60)
launches each worker node as an extra raylet on this machine, with the node type's logical CPUs and
GPUs, and removes it after the idle timeout. What a user's cloud cluster does, minus the boot time.

Why not `ray.cluster_utils.AutoscalingCluster`: in Ray 2.60's wheel it reads an `example.yaml` the
wheel does not ship, and its `start()` runs `ray stop --force`, which kills every Ray on the machine
(a test suite's own included). This writes its own config and stops only the processes it started:
the head (its own session) and whatever runs under its temp dir (the launched raylets and workers).

Two settings found by trying: the provider's `gcs_address` and `--node-ip-address=127.0.0.1`; without
them a launched node dials the host's address at port 6379 and never joins.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from devtools.ports import quiet_port
from devtools.procs import stop_group

HEAD_TYPE = "ray.head.default"  # the fake provider names the head's type so


# What a driver of this cluster needs in its environment: the cluster runs without Ray's token auth,
# and a driver that inherited RAY_AUTH_MODE=token (a `ray.init` of a local cluster earlier in the same
# process sets it) connects, but the actors it starts on launched nodes die before they run (measured).
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class FakeCluster:
    address: str  # host:port of the head's GCS, for `ray.init(address=...)` or `--address`
    config: Path  # the autoscaling config the head's monitor reads
    temp_dir: Path  # every process of this cluster runs under it

    def driver_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` made fit for a driver process of this cluster (no RAY_ADDRESS, auth as it runs)."""
        return {**{k: v for k, v in base.items() if not k.startswith("RAY_ADDRESS")}, **DRIVER_ENV}


def autoscaling_config(
    worker_types: Mapping[str, Mapping[str, float]],
    *,
    gcs_address: str,
    head_resources: Mapping[str, float],
    max_workers: Mapping[str, int],
    idle_timeout_s: float,
) -> dict:
    """The cluster-launcher config of a fake cluster: a head type and ``worker_types`` (each min 0)."""
    types = {HEAD_TYPE: {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}}
    for name, resources in worker_types.items():
        types[name] = {
            # a small object store per launched raylet: this machine holds them all
            "resources": {"object_store_memory": 150 * 1024**2, **resources},
            "node_config": {},
            "min_workers": 0,
            "max_workers": max_workers.get(name, 1),
        }
    return {
        "cluster_name": "totask-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _joined(address: str, temp: Path, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        said = (temp / HEAD_LOG).read_text(errors="replace")[-3000:] if (temp / HEAD_LOG).exists() else ""
        raise RuntimeError(
            f"`ray start --head` (fake autoscaling cluster) exited with {proc.returncode}; it said:\n{said}"
        )
    with socket.socket() as s:
        up = s.connect_ex(("127.0.0.1", int(address.rsplit(":", 1)[1]))) == 0
    # the monitor reads the config only once the head is up: wait for its log as well, and for the
    # address file `ray start` writes when it is done (a driver with no address finds the cluster by it)
    return (
        up
        and (temp / "ray_current_cluster").exists()
        and any((temp / "session_latest" / "logs").glob("monitor.log"))
    )


HEAD_LOG = "ray-start.log"  # what `ray start --head` says, for the error when it exits early


@contextlib.contextmanager
def fake_autoscaling_cluster(
    worker_types: Mapping[str, Mapping[str, float]],
    *,
    max_workers: Mapping[str, int] | None = None,
    head_cpus: float = 0,
    idle_timeout_s: float = 3.0,
    timeout_s: float = 120.0,
) -> Iterator[FakeCluster]:
    """A head of ``head_cpus`` CPUs and node types that start at zero and grow to ``max_workers``.

    The autoscaler polls every second here (``AUTOSCALER_UPDATE_INTERVAL_S=1``), so a node comes up
    in about 3 s and goes 4 s after it is idle (measured on this 2-core box).
    """
    temp = Path(tempfile.mkdtemp(prefix="trf", dir="/tmp"))  # short: unix socket names are limited
    port = quiet_port()
    address = f"127.0.0.1:{port}"
    config = temp / "autoscaling.yaml"
    config.write_text(
        yaml.safe_dump(
            autoscaling_config(
                worker_types,
                gcs_address=address,
                head_resources={"CPU": head_cpus},
                max_workers=max_workers or {},
                idle_timeout_s=idle_timeout_s,
            )
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_enable_autoscaler_v2="0",
        # a launched raylet waits this long for its dashboard agent, then exits: on a loaded 2-core box
        # the default (~30 s) was not always enough (bench/scaleout.py saw it with static clusters)
        RAY_agent_register_timeout_ms="120000",
        **DRIVER_ENV,
    )
    log = (temp / HEAD_LOG).open("wb")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--num-cpus={head_cpus:g}", "--num-gpus=0", f"--temp-dir={temp}",
         f"--autoscaling-config={config}", "--include-dashboard=false", "--disable-usage-stats", "--block",
         # ports of its own: another head on this machine (a suite's, a bench's) holds the defaults
         "--dashboard-host=127.0.0.1", f"--dashboard-port={quiet_port()}",
         f"--ray-client-server-port={quiet_port()}", f"--dashboard-agent-listen-port={quiet_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()  # the head holds its own copy
    try:
        deadline = time.monotonic() + timeout_s
        while not _joined(address, temp, head):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {timeout_s:g} s for the fake autoscaling cluster's head at {address}"
                )
            time.sleep(0.2)
        yield FakeCluster(address=address, config=config, temp_dir=temp)
    finally:
        _stop(head, temp)


def _stop(head: subprocess.Popen, temp: Path) -> None:
    """The head's process group, then every process still running under ``temp`` (the raylets the
    fake provider launched are not the head's children once the monitor is gone)."""
    stop_group(head, 5)
    mine = str(temp)
    for _ in range(2):
        left = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(mine in arg for arg in p.info["cmdline"] or ()):
                    p.kill()
                    left.append(p)
        psutil.wait_procs(left, timeout=10)
    shutil.rmtree(temp, ignore_errors=True)
