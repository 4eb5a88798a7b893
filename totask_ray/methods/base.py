"""What a method is: a check before the run, an annotator actor for the pipeline, and an undo.

The driver runs every method the same way: `prepare` once before any task is read (refuse here,
before anything is deployed or written, rather than fail every task), then the pipeline runs the
`annotator` it returns, `rollback` releases what `prepare` acquired if the run then stops on a
critical error, and `close` lets go of what it holds for the run's length, at the end of any run. A method raises `totask_ray.errors.CriticalError` to stop the run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from totask_ray.params import ToTaskParams
from totask_ray.pipeline.run import AnnotatorSpec
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.base import Platform
from totask_ray.platform.models import DataCollection, Project


@dataclass(frozen=True)
class PrepareInput:
    """What a method may look at before the run: the job, the platform, the project and its collection."""

    params: ToTaskParams
    platform: Platform
    project: Project
    collection: DataCollection


class AnnotationMethod(ABC):
    """One way of filling a task's data (`file`, `inference`)."""

    name: str = "method"

    @abstractmethod
    def prepare(self, job: PrepareInput) -> None:
        """Check (and acquire) what the method needs before any task is read."""

    @abstractmethod
    def annotator(self, spec: RunSpec, stop_flag: Any = None) -> AnnotatorSpec:
        """The actor class the pipeline runs, with its constructor arguments (the run's spec and
        stop flag, and what `prepare` found)."""

    def rollback(self) -> None:  # noqa: B027 - optional: most methods acquire nothing
        """Release what `prepare` acquired. Default: nothing."""

    def close(self) -> None:  # noqa: B027 - optional: most methods hold nothing
        """Let go of what the method holds for the run's length, at its end whatever the outcome
        (after `rollback` on a failure). Default: nothing."""
