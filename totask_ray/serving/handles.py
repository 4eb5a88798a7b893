"""The caller's side of a Serve handle, where Ray Serve leaves it holding on.

A process that has called a `DeploymentHandle` keeps a long-poll call open on the Serve
controller (`listen_for_change`) for as long as it lives, to hear of replicas coming and going.
Ray will not let a worker exit gracefully while a call it made is outstanding, so a Ray Data actor
that used a handle does not exit when Ray Data drops it: the raylet kills it after its 5 s timeout
(measured on Ray 2.60: 5.05 s against 0.05 s for the same actor without a handle), and until then
the actor's CPUs are held from whatever comes next (a second run in the same notebook plans fewer
actors, or none).

`let_go` stops those long polls and cancels the call in flight. It is for an actor whose work is
over; the handle must not be used after it (it would no longer hear of replica changes).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("totask_ray")


def let_go() -> int:
    """Stop every Serve long-poll client in this process and cancel its outstanding call; how
    many calls were cancelled. Best effort: any failure leaves the old behaviour (Ray's kill)."""
    import ray

    try:
        from ray.serve._private.long_poll import LongPollClient
    except ImportError:  # a Ray without it: nothing of ours to let go
        return 0
    cancelled = 0
    # Serve keeps its clients on routers it makes and caches itself (one per handle, one shared
    # per event loop): looking them up by type is what survives its internal renames.
    for client in [o for o in gc.get_objects() if isinstance(o, LongPollClient)]:
        try:
            client.is_running = False  # no next poll once the current one returns
            ref = getattr(client, "_current_ref", None)
            if ref is not None:
                ray.cancel(ref)
                cancelled += 1
        except Exception as exc:
            log.debug("could not stop a Serve long poll: %s", exc)
    return cancelled


class _ClientNoise(logging.Filter):
    """On Serve's logger in a caller's process: drops what is not a problem of the caller's (INFO
    lines such as "Started <...LongPollClient>", and the "LongPollHost errored" records of the polls
    `let_go` cancelled itself, a cancelled task's traceback once per poll). A filter rather than a
    level, because Serve sets that logger's level itself when it makes a router."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        text = record.getMessage()
        return not (text.startswith("LongPollHost errored") and "TaskCancelledError" in text)


def quiet_client_logs() -> None:
    """A caller's process hears from Serve's client side only what goes wrong (`_ClientNoise`);
    errors of the calls themselves reach the run through their outcomes."""
    serve_log = logging.getLogger("ray.serve")
    if not any(isinstance(f, _ClientNoise) for f in serve_log.filters):
        serve_log.addFilter(_ClientNoise())
