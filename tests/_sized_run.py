"""A run against another cluster, as its own driver: `python tests/_sized_run.py SPEC.json`.

The suite's process is already connected to its session cluster and Ray allows one per process, so
the cluster-sizing tests run the job here. SPEC: {"address", "url", "token", "params", "options",
"settle": {"app": NAME, "nodes": N} or null, "await_app": {"app": NAME} or null}. While the run goes, a thread records the cluster's nodes; after
it, with "settle", this waits (with a deadline) for the app's replicas to reach 0 and the cluster to
release every node that holds a GPU or that the run's work was on. The last stdout line is a JSON
summary; the plan's log lines go to stderr with the rest of totask-ray's log. With "await_app", this
waits for an app the run left deployed to come up, then deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def alive() -> list[dict]:
    import ray

    return [
        {"id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0)}
        for n in ray.nodes()
        if n["Alive"]
    ]


def replicas(app: str, states: tuple[str, ...] = ("RUNNING", "STARTING", "UPDATING")) -> int | None:
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


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("totask_ray").setLevel(logging.INFO)
    import ray

    from totask_ray import run_to_task
    from totask_ray.errors import ToTaskError
    from totask_ray.platform.synapse.client import SynapseConfig

    seen: dict[str, dict] = {}
    first_gpu: list[float] = []
    done = threading.Event()
    t0 = time.monotonic()

    def watch() -> None:
        while not done.is_set():
            if ray.is_initialized():
                try:
                    for n in alive():
                        seen.setdefault(n["id"], {**n, "up_s": round(time.monotonic() - t0, 1)})
                        if n["gpus"] and not first_gpu:
                            first_gpu.append(round(time.monotonic() - t0, 1))
                except Exception:  # the driver is connecting or going: the next look sees it
                    pass
            done.wait(0.25)

    threading.Thread(target=watch, daemon=True).start()
    summary: dict = {}
    try:
        result = run_to_task(
            spec["params"],
            platform=SynapseConfig(host=spec["url"], access_token=spec["token"]),
            ray_address=spec["address"],
            progress_bar=False,
            **spec.get("options", {}),
        )
        summary.update(success=result.success_count, failed=result.failed_count, error=None)
    except ToTaskError as exc:
        summary.update(success=0, failed=0, error=str(exc))
    summary["run_s"] = round(time.monotonic() - t0, 1)
    done.set()
    if not ray.is_initialized():
        ray.init(address=spec["address"], log_to_driver=False)
    summary["seen"] = list(seen.values())
    summary["first_gpu_node_s"] = first_gpu[0] if first_gpu else None
    summary["nodes_after_run"] = len(alive())
    settle = spec.get("settle")
    if settle:
        app, deadline = settle["app"], time.monotonic() + settle.get("timeout_s", 120)
        while time.monotonic() < deadline:
            nodes, reps = alive(), replicas(app)
            if reps == 0 and len(nodes) == settle["nodes"]:
                break
            time.sleep(0.5)
        summary.update(
            replicas_settled=replicas(app),
            nodes_settled=len(alive()),
            settle_s=round(time.monotonic() - t0, 1),
        )
    wake = spec.get("await_app")
    if wake:  # an app the run left deployed: does it still come up (the scale-up it was waiting on)?
        from ray import serve

        deadline = time.monotonic() + wake.get("timeout_s", 120)
        while (replicas(wake["app"], ("RUNNING",)) or 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        summary["app_replicas_later"] = replicas(wake["app"], ("RUNNING",))
        summary["app_up_s"] = round(time.monotonic() - t0, 1)
        serve.delete(wake["app"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
