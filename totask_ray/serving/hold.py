"""A run's hold on its pre-processor's replicas: Serve keeps the planned replicas up while a run
holds a lease on the app, and scales them to zero once idle after it (`--keep-warm` aside).

Why: a run's planned app has `min_replicas: 0`, so that the cluster can release its (GPU) nodes after
the run. Serve counts idleness from the moment the replicas run, so the app also scaled to zero
*before* the run's first request, while the annotator pool was still starting (seconds on a loaded
node, minutes when actors wait for nodes). The replica's node then had free CPUs, the pool's actors
took them, and where the autoscaler could add no other node of that type the replica never came
back: no task progressed until the no-progress timeout failed the run (the GPU-pool-from-zero test:
1 run in 3 on a loaded 2-core box, and two CI runs).

Why not a `min_replicas` raised for the run and lowered at its end: Serve gives an imperative
redeploy a new code version, so lowering it restarts the replicas (measured on 2.60), and a driver
killed mid-run would leave the floor up for good. A lease lapses: the run puts one in the GCS's
key-value store, renews it while it goes and deletes it at its end; a killed driver's lapses after
`LEASE_TTL_S`, and the app scales to zero as before.

`hold_while_leased` is the app's Serve autoscaling policy. Serve ships it to its controller by
value, so it refers to nothing but the standard library and Ray.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("totask_ray")

NAMESPACE = "totask_ray"
# How long a lease lives unrenewed (a killed driver's hold ends this long after its last renewal),
# and how often a live run renews it.
LEASE_TTL_S = 120.0
RENEW_EVERY_S = 20.0
# How often the policy reads the leases (Serve asks it every 0.1 s; one GCS read a second is plenty)
POLICY_READ_EVERY_S = 1.0
POLICY = "totask_ray.serving.hold:hold_while_leased"


def lease_prefix(app_name: str) -> bytes:
    """Every lease on ``app_name`` starts so (one per run: two runs may share an app)."""
    return f"hold/{app_name}/".encode()


def hold_while_leased(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's default policy, kept at or above ``initial_replicas`` (the run's plan) while a lease on
    the app is live. Serve applies the bounds, factors and delays to what this returns."""
    import time as _time

    from ray.experimental import internal_kv
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    desired, state = replica_queue_length_autoscaling_policy(ctx)
    state = dict(state or {})
    now = _time.time()
    held_until = float(ctx.policy_state.get("totask_held_until", 0.0))
    read_at = float(ctx.policy_state.get("totask_read_at", 0.0))
    if now - read_at >= POLICY_READ_EVERY_S:
        read_at, held_until = now, 0.0
        try:
            prefix = f"hold/{ctx.app_name}/".encode()
            for key in internal_kv._internal_kv_list(prefix, namespace=NAMESPACE) or ():
                value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
                held_until = max(held_until, float(value or 0.0))
        except Exception:  # the GCS unreachable for a moment: no hold this second, Serve's policy as is
            held_until = 0.0
    state.update(totask_held_until=held_until, totask_read_at=read_at)
    if now < held_until:
        desired = max(desired, ctx.config.initial_replicas or ctx.config.min_replicas or 1)
    return desired, state


class Lease:
    """One run's hold on ``app_name``: `take` puts it and renews it from a daemon thread until
    `release` deletes it. Needs a connected Ray (the driver's)."""

    def __init__(
        self, app_name: str, ttl_s: float = LEASE_TTL_S, renew_every_s: float = RENEW_EVERY_S
    ) -> None:
        self.app_name = app_name
        self.key = lease_prefix(app_name) + uuid.uuid4().hex.encode()
        self.ttl_s, self.renew_every_s = ttl_s, renew_every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(
            self.key, str(time.time() + self.ttl_s), overwrite=True, namespace=NAMESPACE
        )

    def take(self) -> Lease:
        self._put()
        self._thread = threading.Thread(target=self._renew, name=f"totask-hold-{self.app_name}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self._put()
            except Exception as exc:  # the next renewal tries again; the TTL covers a few misses
                log.debug("could not renew the hold on %s: %s", self.app_name, type(exc).__name__)

    def release(self) -> None:
        """Delete the lease: Serve's own scale-down applies from the next policy read (about 1 s)."""
        from ray.experimental import internal_kv

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            internal_kv._internal_kv_del(self.key, namespace=NAMESPACE)
        except Exception as exc:  # Ray already gone (a notebook's shutdown): the lease lapses by itself
            log.debug("could not release the hold on %s: %s", self.app_name, type(exc).__name__)


def _running(app_name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return 0
    return sum(
        n
        for dep in app.deployments.values()
        for state, n in (dep.replica_states or {}).items()
        if getattr(state, "value", state) == "RUNNING"
    )


def holds_by_lease(app_name: str) -> bool:
    """Whether the app scales by `hold_while_leased` (one a run planned), so a lease wakes it."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = (details.get("applications") or {}).get(app_name) or {}
    for dep in (app.get("deployments") or {}).values():
        autoscaling = (dep.get("deployment_config") or {}).get("autoscaling_config") or {}
        if (autoscaling.get("policy") or {}).get("policy_function") == POLICY:
            return True
    return False


def wake(app_name: str, timeout_s: float, poll_s: float = 0.5) -> bool | None:
    """Wait until a held app found at zero replicas (an earlier run's, scaled down since) has one
    running: the lease brings it back at once, and the annotator pool that starts next must not
    race the replica for the node that boots for it. None where there is nothing to wait for (a
    replica runs, or the app does not scale by the hold); else whether one came within
    ``timeout_s``."""
    if _running(app_name) > 0 or not holds_by_lease(app_name):
        return None
    log.info("%s is at zero replicas: waiting up to %.0f s for the one this run holds", app_name, timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _running(app_name) > 0:
            return True
        time.sleep(poll_s)
    return False
