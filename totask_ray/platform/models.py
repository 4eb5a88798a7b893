"""What the platform answers, parsed at the boundary.

Responses are validated here so that a malformed answer becomes a clear `PlatformResponseError`
(or a per-task failure) instead of a KeyError deep inside a worker.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Loose(BaseModel):
    # The real platform adds fields over time; what we read is checked, the rest is kept.
    model_config = ConfigDict(extra="allow")


class ProjectClass(_Loose):
    """One of the project's annotation classes: what a model's labels are mapped to."""

    id: int
    name: str


class Project(_Loose):
    id: int
    title: str | None = None
    data_collection: int | None = None
    # The project's annotation classes (`classes: [{id, name}]`); empty when the platform lists none.
    classes: list[ProjectClass] = Field(default_factory=list)

    @field_validator("data_collection", mode="before")
    @classmethod
    def _dc_id(cls, v: Any) -> Any:
        return v.get("id") if isinstance(v, dict) else v


class FileSpecification(_Loose):
    name: str
    is_primary: bool = False


class DataCollection(_Loose):
    id: int
    name: str | None = None
    file_specifications: list[FileSpecification] = Field(default_factory=list)

    @property
    def specification_names(self) -> list[str]:
        return [s.name for s in self.file_specifications]


class DataFile(BaseModel):
    """One file of a data unit, under its specification name."""

    model_config = ConfigDict(extra="ignore")

    specification: str
    url: str | None = None
    is_primary: bool = False
    name: str | None = None


class DataUnit(_Loose):
    id: int
    files: dict[str, DataFile] = Field(default_factory=dict)

    @field_validator("files", mode="before")
    @classmethod
    def _files(cls, v: Any) -> dict[str, Any]:
        """Accept the dict keyed by specification name, and the reference client's list form."""
        if v is None:
            return {}
        items: list[tuple[str, Any]]
        if isinstance(v, dict):
            items = list(v.items())
        elif isinstance(v, list):
            items = []
            for f in v:
                if not isinstance(f, dict):
                    raise ValueError("each file must be an object")
                spec = f.get("specification") or f.get("specification_name") or f.get("name")
                if isinstance(spec, dict):
                    spec = spec.get("name")
                if not spec:
                    raise ValueError("a file in the list has no specification name")
                items.append((str(spec), f))
        else:
            raise ValueError("files must be an object keyed by specification name")
        out: dict[str, Any] = {}
        for spec, f in items:
            if not isinstance(f, dict):
                raise ValueError(f"file '{spec}' must be an object")
            name = next(
                (
                    f[k]
                    for k in ("file_name_original", "filename", "name")
                    if isinstance(f.get(k), str) and f[k]
                ),
                None,
            )
            out[spec] = {
                "specification": spec,
                "url": f.get("url"),
                "is_primary": bool(f.get("is_primary")),
                "name": name,
            }
        return out

    def primary_file(self) -> DataFile | None:
        """The first file marked primary that has a URL, as the reference client picks it."""
        return next((f for f in self.files.values() if f.is_primary and f.url), None)


class Task(_Loose):
    id: int
    data: dict[str, Any] | None = None
    data_unit: DataUnit | int | None = None
    status: str | None = None
    assignee: int | None = None
    # the project the task is in, where the platform says (Label Studio: a write goes to the project)
    project: int | None = None
    # The platform says this job's result is already there (Label Studio: a prediction of this
    # model_version), and why; the run skips the task, so a re-run writes nothing twice.
    already_done: str | None = None

    @property
    def expanded_data_unit(self) -> DataUnit | None:
        return self.data_unit if isinstance(self.data_unit, DataUnit) else None

    @property
    def data_unit_id(self) -> int | None:
        du = self.data_unit
        return du.id if isinstance(du, DataUnit) else du


class PluginRelease(_Loose):
    id: int
    version: str
    config: dict[str, Any] = Field(default_factory=dict)
    plugin: Any = None

    @property
    def code(self) -> str | None:
        code = self.config.get("code")
        if not code and isinstance(self.plugin, str):
            code = self.plugin
        return code


class ServeApplication(_Loose):
    status: str | None = None
    name: str | None = None


class Agent(_Loose):
    id: int
    name: str | None = None
    url: str | None = None
    status: str | None = None


class Job(_Loose):
    id: int
    status: str | None = None
