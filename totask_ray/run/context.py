"""What a run's steps share while it goes (`RunContext`): its spec (`pipeline/spec.py`), its
platform client and method, and what each step leaves for the next."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

import numpy as np

from totask_ray.methods.base import AnnotationMethod
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.base import Platform
from totask_ray.platform.models import DataCollection, Project

if TYPE_CHECKING:
    from totask_ray.run.jobs import JobSink
    from totask_ray.run.progress import RunTracker


@dataclass
class RunContext:
    """What the steps share: filled in as the run goes, read by the later steps and the result."""

    spec: RunSpec
    client: Platform
    method: AnnotationMethod
    project: Project | None = None
    collection: DataCollection | None = None
    total: int = 0
    exclude: np.ndarray | None = None
    job: JobSink | None = None
    tracker: RunTracker | None = None
    report_file: IO[str] | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
