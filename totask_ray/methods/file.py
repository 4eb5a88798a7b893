"""The file method: a task's data is the annotation JSON attached to its data unit.

Prepare checks that the target specification exists on the project's data collection (one
refusal up front instead of every task failing "no file under specification"). The annotator
reads each task, finds its primary and target files, runs `convert_data_from_file` (by default an
async download of the JSON, with no thread per task), validates and writes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from totask_ray.errors import CriticalError
from totask_ray.methods.base import AnnotationMethod, PrepareInput
from totask_ray.net.downloads import DownloadError
from totask_ray.pipeline.annotator import Annotator, TaskFailed, safe_error
from totask_ray.pipeline.outcomes import Outcome, Stage
from totask_ray.pipeline.run import AnnotatorSpec
from totask_ray.pipeline.spec import RunSpec


class FileMethod(AnnotationMethod):
    name = "file"

    def prepare(self, job: PrepareInput) -> None:
        spec = job.params.target_specification_name
        names = job.collection.specification_names
        if spec not in names:
            known = ", ".join(repr(n) for n in names) or "none"
            raise CriticalError(
                f"Target specification not found: '{spec}' is not a file specification of the project's "
                f"data collection (it has {known})"
            )

    def annotator(self, spec: RunSpec, stop_flag: Any = None) -> AnnotatorSpec:
        return AnnotatorSpec(FileAnnotator, {"spec": spec, "stop_flag": stop_flag})


class FileAnnotator(Annotator):
    """File method: fetch task → locate primary and target files → hook → validate → PUT."""

    empty_message = "the annotation file holds no data"

    def __init__(self, spec: RunSpec, stop_flag: Any = None):
        super().__init__(spec, stop_flag)
        target = spec.params.target_specification_name
        assert target, "the file method needs target_specification_name"
        self.target: str = target
        custom = spec.action_cls.overrides("convert_data_from_file")
        self._convert: Callable[..., Awaitable[Any]] = (
            self._call_user_hook if custom else self._download_default
        )
        if custom:  # say whose data was empty: the plugin's hook, not the file
            self.empty_message = "convert_data_from_file returned no data; nothing is written"

    async def process(self, task_id: int) -> Outcome:
        task, unit = await self.fetch_task(task_id)
        skipped = self.skip_existing(task)
        if skipped is not None:
            return skipped
        primary = unit.primary_file()
        if primary is None:
            raise TaskFailed(Stage.LOCATE, "the data unit has no primary file with a URL")
        target = unit.files.get(self.target)
        if target is None:
            raise TaskFailed(Stage.LOCATE, f"the data unit has no file under specification '{self.target}'")
        if not target.url:
            raise TaskFailed(Stage.LOCATE, f"file '{self.target}' has no URL")
        try:
            data = await self._convert(primary.url, primary.name, target.url, target.name, task.model_dump())
        except DownloadError as exc:
            raise TaskFailed(Stage.CONVERT, safe_error(exc)) from exc
        except TaskFailed:
            raise
        except Exception as exc:
            raise TaskFailed(Stage.CONVERT, f"convert_data_from_file raised {safe_error(exc)}") from exc
        return await self.validate_and_write(task, data, image_url=primary.url)

    async def _download_default(
        self, primary_url: str, primary_name: Any, data_url: str, data_name: Any, task_data: Any
    ) -> Any:
        assert self._downloader is not None
        return await self._downloader.fetch_json(data_url, max_bytes=self.options.max_json_bytes)

    async def _call_user_hook(self, *args: Any) -> Any:
        return await self.call_hook(self.action.convert_data_from_file, *args)
