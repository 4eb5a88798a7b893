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


class Faults:
    """Injected faults for matching requests: errors answered before the handler, or slowness.

    Seeded, so that a failing run under faults can be replayed request for request."""

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.pattern = re.compile(cfg.path_regex) if cfg.path_regex else None
        self.methods = {m.upper() for m in cfg.methods} if cfg.methods else None
        self.stats = {"matched": 0, "errors": 0, "slowed": 0, "by_status": {}}

    def decide(self, method: str, path: str) -> tuple[str, float] | None:
        if self.methods is not None and method not in self.methods:
            return None
        if self.pattern is not None and not self.pattern.search(path):
            return None
        self.stats["matched"] += 1
        if self.cfg.error_rate > 0 and self.rng.random() < self.cfg.error_rate:
            status = self.rng.choice(self.cfg.statuses)
            self.stats["errors"] += 1
            by = self.stats["by_status"]
            by[str(status)] = by.get(str(status), 0) + 1
            return ("error", status)
        if self.cfg.slow_rate > 0 and self.rng.random() < self.cfg.slow_rate:
            self.stats["slowed"] += 1
            return ("slow", self.cfg.slow_s)
        return None
