"""What ``pre_processor_params`` may say: the models a pre-processor's params are declared with.

:class:`CommonParams` holds the keys every pre-processor understands; an app declares its own keys by
subclassing it and naming the subclass on its ``PreProcessorSpec`` (plugin authors import these from
:mod:`totask_ray.serving.interface`). :class:`InferenceParams` is what a replica receives: the same
keys, lenient about the rest. Refusing bad params at prepare is :mod:`~totask_ray.serving.params_check`'s
job; this module only says what is valid. It imports neither Ray nor any model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "CommonParams",
    "Device",
    "InferenceParams",
    "ModelSettings",
    "PostProcessing",
]

Device = Literal["cpu", "cuda", "auto"]


def _as_list(v: Any) -> Any:
    # `class_filter: face` in a form is as clear as `[face]`; a lone value should not be refused.
    return [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v


def _empty_if_none(v: Any) -> Any:
    # `model_config:` with nothing under it is YAML's null: the same as leaving the group out.
    return {} if v is None else v


ClassRef = Annotated[int, Strict(), Field(ge=0)] | Annotated[str, Strict(), Field(min_length=1)]


def _is_number(annotation: Any) -> bool:
    kinds = {annotation, *get_args(annotation)}
    return bool(kinds & {int, float}) and bool not in kinds


class _Params(BaseModel):
    """Params arrive as JSON or YAML, where ``yes`` is a boolean: ``max_objects: yes`` must not be 1."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("expected a number, not a boolean")
        return v


class ModelSettings(_Params):
    """``pre_processor_params.model_config``: how the app runs its model, not what it keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int | None = Field(None, ge=1, description="an integer >= 1 (images per model call)")
    device: Device | None = Field(None, description="cpu, cuda or auto")


class PostProcessing(_Params):
    """``pre_processor_params.post_processing``: the user guide puts ``nms_threshold`` here too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nms_threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="a number from 0 to 1 (an IoU)"
    )


class CommonParams(_Params):
    """The ``pre_processor_params`` every pre-processor understands; an app's params model extends it.

    Declared strictly (``extra="forbid"``) so that a model is a complete statement of what the app
    reads; :func:`~totask_ray.serving.params_check.check_params` takes unknown keys off first and reports them instead of failing.
    ``threshold`` is accepted for ``confidence_threshold`` because that is the key Synapse's own
    inference call sends (``{"image_path": ..., "threshold": 0.5}``).
    """

    model_config = ConfigDict(extra="forbid")

    confidence_threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("confidence_threshold", "threshold"),
        description="a number from 0 to 1",
    )
    nms_threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="a number from 0 to 1 (an IoU)"
    )
    class_filter: Annotated[list[ClassRef] | None, BeforeValidator(_as_list)] = Field(
        None, description="a list of the model's class names or ids"
    )
    max_objects: int | None = Field(None, ge=1, description="an integer >= 1")
    min_object_size: float | None = Field(
        None, ge=0.0, allow_inf_nan=False, description="a number of pixels >= 0"
    )
    # `model_config` is pydantic's own attribute: the field gets another name and the key as alias.
    model_settings: Annotated[ModelSettings, BeforeValidator(_empty_if_none)] = Field(
        default_factory=ModelSettings, alias="model_config", description="a mapping of batch_size, device"
    )
    post_processing: Annotated[PostProcessing, BeforeValidator(_empty_if_none)] = Field(
        default_factory=PostProcessing, description="a mapping of nms_threshold"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        # Pydantic would take the first alias it finds and keep the other as an extra: refuse instead.
        if not (isinstance(data, Mapping) and "threshold" in data and "confidence_threshold" in data):
            return data
        if data["threshold"] != data["confidence_threshold"]:
            raise ValueError(
                "confidence_threshold is given twice (confidence_threshold and threshold) with "
                "different values; give one"
            )
        return {k: v for k, v in data.items() if k != "threshold"}

    @model_validator(mode="after")
    def _one_nms(self) -> CommonParams:
        top, nested = self.nms_threshold, self.post_processing.nms_threshold
        if top is not None and nested is not None and top != nested:
            raise ValueError(
                f"nms_threshold is given twice with different values (nms_threshold={top}, "
                f"post_processing.nms_threshold={nested}); give one"
            )
        return self

    @property
    def iou_threshold(self) -> float | None:
        """The NMS threshold, from either of the two places a user may write it."""
        return self.nms_threshold if self.nms_threshold is not None else self.post_processing.nms_threshold

    @property
    def batch_size(self) -> int | None:
        return self.model_settings.batch_size

    @property
    def device(self) -> str | None:
        return self.model_settings.device


class _RuntimeModelSettings(ModelSettings):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _RuntimePostProcessing(PostProcessing):
    model_config = ConfigDict(extra="ignore", frozen=True)


class InferenceParams(CommonParams):
    """Per-call options as a replica receives them. Unknown keys are kept for the app's own options.

    Lenient where :class:`CommonParams` is strict: a caller that bypasses :func:`~totask_ray.serving.params_check.check_params` (an HTTP
    client, the platform) may send keys of another app (``model_config.use_fp16``); they must not turn
    into a 400. Values of the known keys are still checked.
    """

    model_config = ConfigDict(extra="allow")

    model_settings: Annotated[_RuntimeModelSettings, BeforeValidator(_empty_if_none)] = Field(
        default_factory=_RuntimeModelSettings, alias="model_config"
    )
    post_processing: Annotated[_RuntimePostProcessing, BeforeValidator(_empty_if_none)] = Field(
        default_factory=_RuntimePostProcessing
    )

    @property
    def extras(self) -> dict[str, Any]:
        """The app-specific keys, e.g. ``{"min_neighbors": 3}`` for the face detector."""
        return dict(self.model_extra or {})
