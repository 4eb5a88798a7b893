"""The run's stop flag pushes its state: an idle annotator holds one waiting call, a stop reaches it
at once, and the driver says when the run is over (rather than the actors inferring it from a lost
flag). Real Ray actors holding real `StopWatch`es, as annotators do."""

from __future__ import annotations

import time

import pytest
from helpers import wait_until

from totask_ray.pipeline.stop import create_flag, finish

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _idle_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class Idle:
        """An annotator's stop-watch and nothing else: it never calls the flag itself."""

        def __init__(self, flag) -> None:
            self.flag = flag
            self.released = False

        async def start(self) -> None:
            from totask_ray.pipeline.stop import StopWatch

            self.watch = StopWatch(self.flag, on_run_over=self._release)
            self.watch.start()

        def _release(self) -> None:
            self.released = True

        async def state(self) -> tuple[bool, bool, bool]:
            return self.watch.stopped, self.watch.run_over, self.released

    return Idle


@pytest.mark.parametrize("actors", [8, 32])
def test_a_stop_reaches_idle_actors_at_once_and_costs_the_flag_two_calls_each(actors):
    import ray

    flag = create_flag()
    pool = [_idle_actor_class().remote(flag) for _ in range(actors)]
    ray.get([a.start.remote() for a in pool])

    def stats() -> dict[str, int]:
        return ray.get(flag.stats.remote())

    wait_until(lambda: stats()["waiting"] == actors, f"all {actors} actors waiting on the flag", 60)
    assert stats()["calls"] == actors  # one call each, however long they stay idle

    def states() -> list[tuple[bool, bool, bool]]:
        return ray.get([a.state.remote() for a in pool])

    t0 = time.monotonic()
    flag.set.remote()
    wait_until(lambda: all(s[0] for s in states()), f"all {actors} actors to see the stop", 10)
    took = time.monotonic() - t0
    assert took < 1.0, f"the stop took {took:.2f} s to reach {actors} idle actors"
    wait_until(lambda: stats()["waiting"] == actors, "the actors waiting again, for the run's end", 10)
    assert stats()["calls"] == 2 * actors  # the stop cost one more call each: no polling
    assert not any(s[1] for s in states())  # stopped is not over: tasks in flight still report

    finish(flag)  # the driver's word: the run is over
    wait_until(lambda: all(s[1] and s[2] for s in states()), "every actor told the run is over", 10)


def test_a_flag_lost_without_the_word_stops_the_actor_with_a_warning():
    import ray

    flag = create_flag()
    [actor] = [_idle_actor_class().remote(flag)]
    ray.get(actor.start.remote())
    wait_until(lambda: ray.get(flag.stats.remote())["waiting"] == 1, "the actor waiting on the flag", 60)
    ray.kill(flag)  # as when its driver dies: no `finish`
    wait_until(
        lambda: ray.get(actor.state.remote()) == (True, True, True), "the actor to give up the run", 10
    )
