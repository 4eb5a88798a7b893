"""What a user may ask a run to do: `ToTaskParams` (what they get back is `totask_ray.result`).

Parameter names are the Synapse ToTask action's, so a Synapse user learns nothing new. Everything is
validated before anything runs; `ParamsError` turns pydantic's errors into one line per field that
says what was wrong and what to do, and never echoes a value that could be a secret.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class Method(StrEnum):
    FILE = "file"
    INFERENCE = "inference"


class ExistingDataPolicy(StrEnum):
    """What to do with a task that already holds annotation data."""

    OVERWRITE = "overwrite"  # what the Synapse action does
    SKIP = "skip"  # the safe choice for re-runs


class EmptyResultPolicy(StrEnum):
    """What to do with an inference result that holds no object (a face-free photo, say)."""

    WRITE = "write"  # the Synapse SDK's rule: written, a success, counted apart as `empty`
    FAIL = "fail"  # the task fails: someone should look at it
    SKIP = "skip"  # nothing is written; the task counts as skipped


class UnmappedLabels(StrEnum):
    """What to do with a model label that matches none of the project's classes."""

    REFUSE = "refuse"  # the run is refused at prepare, both lists shown
    DROP = "drop"  # objects with such a label are left out


class ParamsError(ValueError):
    """Job parameters that cannot run; `problems` holds one `(field, message)` per violation."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  - {field}: {msg}" for field, msg in problems)
        super().__init__(f"Invalid job parameters ({len(problems)} problem(s)):\n{lines}")


# What to tell the user for each field, beyond pydantic's own words.
_HINTS: dict[str, str] = {
    "name": "give a non-blank name without spaces, e.g. 'File_Annotation_Job'",
    "project": "give the numeric id of the Synapse project, e.g. 123",
    "agent": "give the numeric id of the agent, e.g. 1, or leave it out",
    "task_filters": "give a mapping of task query filters, e.g. {status: pending}",
    "method": "use 'file' or 'inference'",
    "target_specification_name": "name the file specification that holds the annotation JSON, e.g. 'annotation_data'",
    "pre_processor": "give the numeric id of the pre-processor plugin release, e.g. 789",
    "model": "give the numeric id of the model, or leave it out",
    "pre_processor_params": "give a mapping, e.g. {confidence_threshold: 0.8}",
    "batch_size": "use a whole number of at least 1, e.g. 32",
    "schema": "use 'dm_schema_v1' (validate objects) or 'any' (any JSON object)",
    "existing_data": "use 'overwrite' or 'skip'",
    "on_success": "give a workflow action, e.g. {status: in_review} or {assignee: 12}",
    "label_map": "map each model label to a project class name or id, e.g. {face: Person}",
    "unmapped_labels": "use 'refuse' or 'drop'",
    "empty_result": "use 'write', 'fail' or 'skip'",
}

_WHITESPACE = re.compile(r"\s")


class OnSuccess(BaseModel):
    """A workflow action applied to each task after its annotation is written (Encord: "submit")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: str | None = None
    assignee: int | None = None
    submit: bool = False

    @model_validator(mode="after")
    def _something_to_do(self) -> OnSuccess:
        if self.status is None and self.assignee is None and not self.submit:
            raise ValueError("set at least one of status, assignee or submit")
        return self


class ToTaskParams(BaseModel):
    """Job parameters, with the names of the Synapse ToTask action."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str
    description: str | None = None
    project: Annotated[int, Field(gt=0)]
    agent: Annotated[int, Field(gt=0)] | None = None
    task_filters: dict[str, Any] = Field(default_factory=dict)
    method: Method = Method.FILE
    target_specification_name: str | None = None
    pre_processor: Annotated[int, Field(gt=0)] | None = None
    model: Annotated[int, Field(gt=0)] | None = None
    pre_processor_params: dict[str, Any] = Field(default_factory=dict)
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 32
    schema_: Literal["dm_schema_v1", "any"] = Field(default="dm_schema_v1", alias="schema")
    existing_data: ExistingDataPolicy = ExistingDataPolicy.OVERWRITE
    on_success: OnSuccess | None = None
    # inference: the model's labels -> the project's classes (by name unless mapped here)
    label_map: dict[str, str | int] = Field(default_factory=dict)
    unmapped_labels: UnmappedLabels = UnmappedLabels.REFUSE
    empty_result: EmptyResultPolicy = EmptyResultPolicy.WRITE

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        if _WHITESPACE.search(v):
            raise ValueError("must not contain whitespace")
        return v

    @field_validator("project", "agent", "pre_processor", "model", "batch_size", mode="before")
    @classmethod
    def _strict_int(cls, v: Any) -> Any:
        # YAML gives ints already; reject bools and floats such as 1.5 rather than coerce them.
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError("must be a whole number")
        return v

    @field_validator("task_filters")
    @classmethod
    def _filters(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if not isinstance(key, str) or not key:
                raise ValueError("filter names must be non-empty strings")
            if isinstance(value, dict):
                raise ValueError(f"filter '{key}' must be a value or a list of values, not a mapping")
        return v

    @model_validator(mode="after")
    def _method_needs(self) -> ToTaskParams:
        if self.method is Method.FILE and not (self.target_specification_name or "").strip():
            raise ValueError("target_specification_name is required when method is 'file'")
        if self.method is Method.INFERENCE and self.pre_processor is None:
            raise ValueError("pre_processor is required when method is 'inference'")
        return self

    @property
    def schema(self) -> str:  # type: ignore[override]
        """The annotation schema name (`schema` shadows a deprecated BaseModel classmethod)."""
        return self.schema_

    @classmethod
    def parse(cls, data: Any) -> ToTaskParams:
        """Validate raw parameters; raise `ParamsError` naming every bad field and what to do."""
        if isinstance(data, ToTaskParams):
            return data
        if not isinstance(data, dict):
            raise ParamsError([("(params)", "must be a mapping of parameter names to values")])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ParamsError(_problems(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> ToTaskParams:
        """Load parameters from a YAML or JSON file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ParamsError(
                [("(file)", f"{p} does not exist; give the path of a YAML or JSON job file")]
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ParamsError(
                [("(file)", f"{p} cannot be read as UTF-8 text ({type(exc).__name__})")]
            ) from None
        try:
            data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            where = getattr(exc, "problem_mark", None) or getattr(exc, "lineno", None)
            raise ParamsError(
                [("(file)", f"{p} is not valid {p.suffix.lstrip('.').upper() or 'YAML'}: {where}")]
            ) from None
        return cls.parse(data)

    def to_synapse(self) -> dict[str, Any]:
        """The parameters as the Synapse action receives them (its names, no unset optionals)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc) if loc else "(params)"
        kind = err["type"]
        if kind == "extra_forbidden":
            if len(loc) > 1 and loc[0] == "on_success":  # a key inside on_success, not a parameter
                known = ", ".join(sorted(OnSuccess.model_fields))
                out.append((field, f"is not a known field of on_success; known fields are: {known}"))
                continue
            known = ", ".join(sorted((f.alias or n) for n, f in ToTaskParams.model_fields.items()))
            out.append((field, f"is not a known parameter; known parameters are: {known}"))
            continue
        msg = "is required" if kind == "missing" else str(err["msg"]).removeprefix("Value error, ")
        if not loc:  # a model-level rule names its own field
            field = msg.split(" ", 1)[0]
            out.append((field, msg.split(" ", 1)[1] if " " in msg else msg))
            continue
        hint = _HINTS.get(loc[0])
        out.append((field, f"{msg}; {hint}" if hint else msg))
    return out
