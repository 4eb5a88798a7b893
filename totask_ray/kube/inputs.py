"""The job file and its pre-processor's release config, read and checked before anything is written.

The job file is validated as ``totask-ray run`` would (``ToTaskParams``) and then shipped as written,
so the pod runs exactly the file the user reviewed. An inference job needs its release config
(``--release ID=config.yaml``, as ``run`` takes it for Label Studio): the RayService's Serve config is
built from it, offline, without asking the platform.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from totask_ray.params import Method, ParamsError, ToTaskParams
from totask_ray.serving.config import (
    PreProcessorRelease,
    ReleaseConfigError,
    load_release_config,
)


class RenderError(ValueError):
    """What is wrong with the render's inputs, and how to fix it (no path outside the user's own)."""


@dataclass(frozen=True)
class ReleaseInput:
    """A release config given as ``ID=path``: its id, the parsed release, the file as written."""

    id: int
    release: PreProcessorRelease
    text: str


@dataclass(frozen=True)
class JobInput:
    """The job file (parsed, and as written) and, for an inference job, its release."""

    params: ToTaskParams
    text: str
    release: ReleaseInput | None

    @property
    def is_inference(self) -> bool:
        return self.params.method is Method.INFERENCE


def read_release(spec: str) -> ReleaseInput:
    """``ID=path/to/config.yaml`` -> the release (its config validated as ``serve deploy`` does)."""
    rid, sep, path = spec.partition("=")
    if not sep or not rid.strip().isdigit():
        raise RenderError(
            f"--release takes ID=path/to/config.yaml, e.g. 34=serve_apps/faces/config.yaml; got {spec!r}"
        )
    try:
        config = load_release_config(path)
        text = (Path(path) / "config.yaml" if Path(path).is_dir() else Path(path)).read_text(encoding="utf-8")
    except (ReleaseConfigError, OSError) as exc:
        raise RenderError(str(exc)) from None
    return ReleaseInput(int(rid), PreProcessorRelease.from_config(config, id=int(rid)), text)


def read_job(job: Path, releases: list[str]) -> JobInput:
    """The job and the one release it uses; a release it does not use is refused (a typo, likely)."""
    try:
        params = ToTaskParams.from_file(job)
        text = job.read_text(encoding="utf-8")
    except ParamsError as exc:
        raise RenderError(str(exc)) from None
    given = [read_release(spec) for spec in releases]
    wanted = params.pre_processor if params.method is Method.INFERENCE else None
    unused = [r.id for r in given if r.id != wanted]
    if unused:
        uses = f"uses pre_processor {wanted}" if wanted is not None else "is a file job and uses no release"
        raise RenderError(f"--release {unused[0]}: the job {uses}; leave the other --release out")
    release = next((r for r in given if r.id == wanted), None)
    if wanted is not None and release is None:
        raise RenderError(
            f"the job runs pre_processor {wanted}: give its release config with "
            f"--release {wanted}=path/to/config.yaml (the RayService's Serve config is built from it)"
        )
    return JobInput(params, text, release)
