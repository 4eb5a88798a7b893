"""Injected faults (tests and benchmarks only): what the gate answers instead of the handler.

Apart from the gate and the state, so that the state can hold the faults in force without
importing the gate that reads it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

__all__ = ["FaultConfig", "Faults"]


@dataclass
class FaultConfig:
    error_rate: float = 0.0
    statuses: list[int] = field(default_factory=lambda: [503])
    retry_after_s: float = 1.0
    slow_rate: float = 0.0
    slow_s: float = 0.0
    path_regex: str | None = None
    methods: list[str] | None = None
    seed: int = 0
    # At most this many errors in a row for one method and path (None: no bound). A client that
    # retries more often than this always gets through, so a test of its retries cannot lose a
    # task to a rare long run of faults (at 10 %, six in a row on one of a thousand requests).
    max_in_a_row: int | None = None


class Faults:
    """Injected faults for matching requests: errors answered before the handler, or slowness.

    Seeded, so that a failing run under faults can be replayed request for request."""

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.pattern = re.compile(cfg.path_regex) if cfg.path_regex else None
        self.methods = {m.upper() for m in cfg.methods} if cfg.methods else None
        self.stats = {"matched": 0, "errors": 0, "slowed": 0, "by_status": {}}
        self._in_a_row: dict[tuple[str, str], int] = {}

    def decide(self, method: str, path: str) -> tuple[str, float] | None:
        if self.methods is not None and method not in self.methods:
            return None
        if self.pattern is not None and not self.pattern.search(path):
            return None
        self.stats["matched"] += 1
        key = (method, path)
        if self.cfg.error_rate > 0 and self.rng.random() < self.cfg.error_rate and self._may_fail(key):
            self._in_a_row[key] = self._in_a_row.get(key, 0) + 1
            status = self.rng.choice(self.cfg.statuses)
            self.stats["errors"] += 1
            by = self.stats["by_status"]
            by[str(status)] = by.get(str(status), 0) + 1
            return ("error", status)
        self._in_a_row.pop(key, None)
        if self.cfg.slow_rate > 0 and self.rng.random() < self.cfg.slow_rate:
            self.stats["slowed"] += 1
            return ("slow", self.cfg.slow_s)
        return None

    def _may_fail(self, key: tuple[str, str]) -> bool:
        bound = self.cfg.max_in_a_row
        return bound is None or self._in_a_row.get(key, 0) < bound
