"""What maps where between Label Studio and a run, as pure functions over Label Studio's JSON.

- a project is a project; its classes are the labels its labeling config offers;
- a task's files are its data keys (`data.image` is the primary file, the key the config's
  `<Image value="$image">` names); relative URLs (`/data/upload/...`, `/data/local-files/...`)
  are made absolute on the server (and fetched with the token, and only there: the client);
- a write is a prediction with `model_version` and region scores, or an annotation on request;
- a task that already holds a prediction of this `model_version` (annotations: any annotation)
  is done: the run skips it, so a re-run writes nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from totask_ray.platform.base import TaskIdPage
from totask_ray.platform.errors import PlatformError, PlatformResponseError, ValidationFailed
from totask_ray.platform.http import as_dict
from totask_ray.platform.label_studio.config import LabelStudioConfig, WriteAs
from totask_ray.platform.label_studio.convert import ConversionError, to_results
from totask_ray.platform.label_studio.labeling import (
    LabelingConfig,
    LabelingConfigError,
    parse_labeling_config,
)
from totask_ray.platform.models import (
    DataCollection,
    DataUnit,
    FileSpecification,
    Project,
    ProjectClass,
    Task,
)


@dataclass(frozen=True)
class ProjectInfo:
    project: Project
    labeling: LabelingConfig

    @property
    def classes(self) -> dict[int, str]:
        return {c.id: c.name for c in self.project.classes}


def parse_project(body: Any) -> ProjectInfo:
    body = as_dict(body)
    try:
        labeling = parse_labeling_config(body.get("label_config") or "")
    except LabelingConfigError as exc:
        raise PlatformError(f"Label Studio project {body.get('id')}: {exc}") from None
    classes = [ProjectClass(id=i, name=name) for i, name in enumerate(labeling.labels)]
    project = Project(id=body["id"], title=body.get("title"), data_collection=body["id"], classes=classes)
    return ProjectInfo(project, labeling)


def id_page(limit: int | None, page: int, size: int):
    """A parser for one page of a task listing, cut at the filter's `limit`."""

    def parse(body: Any) -> TaskIdPage:
        body = as_dict(body)
        tasks, total = body.get("tasks"), body.get("total")
        if not isinstance(tasks, list) or not isinstance(total, int):
            raise ValueError("a task listing must carry 'tasks' and 'total'")
        ids = []
        for t in tasks:
            tid = t.get("id") if isinstance(t, dict) else None
            if not isinstance(tid, int) or isinstance(tid, bool):
                raise ValueError("every listed task must carry an integer 'id'")
            ids.append(tid)
        count = total if limit is None else min(total, limit)
        first = (page - 1) * size
        ids = ids[: max(0, count - first)]
        more = first + size < count
        return TaskIdPage(count=count, ids=ids, next=str(page + 1) if more else None)

    return parse


def to_task(raw: dict[str, Any], info: ProjectInfo | None, config: LabelStudioConfig) -> Task:
    """A Label Studio task as the run sees it: its data keys as files, what it already holds."""
    tid = raw.get("id")
    if not isinstance(tid, int):
        raise PlatformResponseError("a Label Studio task came back without an integer id")
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    primary = info.labeling.image_key if info is not None else None
    files = {}
    for key, value in data.items():
        if isinstance(value, str) and value:
            url = urljoin(f"{config.host}/", value) if value.startswith("/") else value
            files[key] = {"url": url, "is_primary": key == primary, "specification": key}
    project = raw.get("project")
    return Task(
        id=tid,
        data=None,
        data_unit=DataUnit(id=tid, files=files),
        already_done=done_reason(raw, config),
        project=project if isinstance(project, int) else None,
    )


def holds_prediction(raw: dict[str, Any], model_version: str | None) -> bool:
    return any(
        isinstance(p, dict) and p.get("model_version") == model_version for p in raw.get("predictions") or []
    )


def kept_annotations(raw: dict[str, Any]) -> int:
    """The task's annotations that a person did not skip (`was_cancelled`): a skip holds no labels.
    A listing's tasks carry `total_annotations` (skips left out), and their annotations only as
    stubs without `was_cancelled`; a task read alone carries whole annotations."""
    total = raw.get("total_annotations")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    return sum(1 for a in raw.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled"))


def done_reason(raw: dict[str, Any], config: LabelStudioConfig) -> str | None:
    if config.write is WriteAs.ANNOTATIONS:
        return "the task already holds an annotation" if kept_annotations(raw) else None
    if holds_prediction(raw, config.model_version):
        return f"the task already holds a prediction of model_version {config.model_version!r}"
    return None


def convert(
    task_id: int, data: dict[str, Any], info: ProjectInfo, image_size: tuple[int, int] | None
) -> tuple[list[dict[str, Any]], float | None]:
    try:
        return to_results(data, info.labeling, info.classes, image_size)
    except ConversionError as exc:
        raise ValidationFailed(
            "POST", f"task {task_id}", 400, f"cannot convert to Label Studio: {exc}"
        ) from None


def prediction(
    task_id: int, result: list[dict[str, Any]], score: float | None, config: LabelStudioConfig
) -> dict[str, Any]:
    item: dict[str, Any] = {"task": int(task_id), "result": result, "model_version": config.model_version}
    if score is not None:
        item["score"] = score
    return item


def annotation(result: list[dict[str, Any]]) -> dict[str, Any]:
    return {"result": result, "was_cancelled": False, "ground_truth": False}


def collection(info: ProjectInfo, sample: dict[str, Any] | None) -> DataCollection:
    """The project's files: the labeling config's image keys, and a sample task's data keys."""
    keys = dict.fromkeys(info.labeling.images.values())
    if sample is not None and isinstance(sample.get("data"), dict):
        keys.update(dict.fromkeys(k for k, v in sample["data"].items() if isinstance(v, str)))
    primary = info.labeling.image_key
    specs = [FileSpecification(name=k, is_primary=k == primary) for k in keys]
    return DataCollection(id=info.project.id, name=info.project.title, file_specifications=specs)
