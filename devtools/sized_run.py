"""A run against another cluster, as its own driver: `python -m devtools.sized_run SPEC.json`.

For the cluster-sizing tests and `bench scaleout`: their own process is connected to a cluster of
its own (or to none), and Ray allows one per process. SPEC:
- "address", "url", "token", "params", "options": the cluster, the platform, the job, the run's options;
- "settle": {"app": NAME, "nodes": N, "timeout_s": S} (optional): after the run, wait until the app
  has no replica and N nodes are alive (the planned replicas scaled to zero, their nodes released);
- "await_app": {"app": NAME, "timeout_s": S} (optional): after the run, wait until an app the run left
  deployed has a running replica, then delete it;
- "stacks_after_s": S (optional): print every thread's stack to stderr once S s in, so a caller
  that kills a driver that ran too long sees where it waited.

While the run goes, a thread records the nodes that come up. The JSON summary goes to the file
SPEC's "summary" names (default: SPEC with `.summary.json`), not to stdout: the driver prints its
workers' and the autoscaler's lines there (`log_to_driver`), at any time, the last line included.
The plan's log lines go to stderr with the rest of totask-ray's log.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

LIVE = ("RUNNING", "STARTING", "UPDATING")


def gpu_ocr_release(store: Any, version: str) -> tuple[int, str]:
    """The OCR release planned (no num_replicas) and needing one whole GPU per replica, stored on the
    embedded platform; its id and app name. Its memory reservation is dropped: the fake provider
    cannot give a node type a `memory` resource, so the autoscaler would find no node for it."""
    from totask_ray.embedded.seeds.registry import release_config

    cfg = release_config("ocr")
    cfg["version"] = version
    rr = cfg["actions"]["inference"]["required_resources"]
    rr.pop("memory", None)
    rr["required_gpu_count"] = 1
    cfg["actions"]["deployment"]["serve_options"].pop("num_replicas", None)
    return store.create_plugin_release("ocr", version, cfg), f"ocr@{version}"


def alive() -> list[dict[str, Any]]:
    import ray

    return [
        {"id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0)}
        for n in ray.nodes()
        if n["Alive"]
    ]


def replicas(app: str, states: tuple[str, ...] = LIVE) -> int | None:
    """The app's replicas in ``states``; None when there is no such app."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return None
    return sum(
        n
        for dep in status.deployments.values()
        for state, n in dep.replica_states.items()
        if getattr(state, "value", state) in states
    )


def _settle(spec: dict[str, Any], t1: float) -> dict[str, Any]:
    app, deadline = spec["app"], t1 + spec.get("timeout_s", 120)
    zero = back = None
    counts: list[tuple[float, int]] = []  # (s from the run's end, nodes) whenever the count changed
    while time.monotonic() < deadline:
        nodes, reps, now = len(alive()), replicas(app), round(time.monotonic() - t1, 1)
        if not counts or counts[-1][1] != nodes:
            counts.append((now, nodes))
        if zero is None and reps in (0, None):
            zero = now
        if nodes == spec["nodes"] and reps in (0, None):
            back = now
            break
        time.sleep(0.5)
    return {"replicas_zero_s": zero, "back_s": back, "node_counts": counts,
            "nodes_settled": len(alive()), "replicas_settled": replicas(app)}  # fmt: skip


def _await_app(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    from ray import serve

    deadline = time.monotonic() + spec.get("timeout_s", 120)
    while (replicas(spec["app"], ("RUNNING",)) or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    out = {
        "app_replicas_later": replicas(spec["app"], ("RUNNING",)),
        "app_up_s": round(time.monotonic() - t0, 1),
    }
    serve.delete(spec["app"])
    return out


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    import ray

    from totask_ray import run_to_task
    from totask_ray.errors import ToTaskError
    from totask_ray.platform.synapse.client import SynapseConfig

    seen: dict[str, dict[str, Any]] = {}
    done = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:
        while not done.is_set():
            if ray.is_initialized():
                try:
                    for n in alive():
                        seen.setdefault(n["id"], {**n, "up_s": round(time.monotonic() - t0, 1)})
                except Exception:  # the driver is connecting or going: the next look sees it
                    pass
            done.wait(0.25)

    out: dict[str, Any] = {"started_epoch": time.time()}
    threading.Thread(target=watch, daemon=True).start()
    try:
        result = run_to_task(
            spec["params"],
            platform=SynapseConfig(host=spec["url"], access_token=spec["token"]),
            ray_address=spec["address"],
            progress_bar=False,
            **spec.get("options", {}),
        )
        out.update(success=result.success_count, failed=result.failed_count, error=None)
    except ToTaskError as exc:
        out.update(success=0, failed=0, error=str(exc))
    t1 = time.monotonic()
    done.set()
    out["run_s"] = round(t1 - t0, 1)
    if not ray.is_initialized():
        ray.init(address=spec["address"], log_to_driver=False, configure_logging=False)
    out["seen"] = list(seen.values())
    gpu_up = [n["up_s"] for n in seen.values() if n["gpus"]]
    out["first_gpu_node_s"] = min(gpu_up) if gpu_up else None
    out["nodes_after_run"] = len(alive())
    if spec.get("settle"):
        out.update(_settle(spec["settle"], t1))
    if spec.get("await_app"):
        out.update(_await_app(spec["await_app"], t0))
    return out


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("totask_ray").setLevel(logging.INFO)
    path = Path(sys.argv[1])
    spec = json.loads(path.read_text())
    if spec.get("stacks_after_s"):
        faulthandler.dump_traceback_later(spec["stacks_after_s"])
    summary = drive(spec)
    summary_path(path, spec).write_text(json.dumps(summary))


def summary_path(spec_path: Path, spec: dict[str, Any]) -> Path:
    """Where the driver of SPEC writes its summary (read it back with `read_summary`)."""
    return Path(spec.get("summary") or spec_path.with_suffix(".summary.json"))


def read_summary(spec_path: Path) -> dict[str, Any] | None:
    """The summary the driver of SPEC wrote, or None when it wrote none (it failed first)."""
    path = summary_path(spec_path, json.loads(spec_path.read_text()))
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    main()
