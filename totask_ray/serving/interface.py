"""The contract a pre-processor implements: what a plugin author writes, and nothing else.

In the spirit of CVAT's ``cvat_sdk/auto_annotation/interface.py``: a pre-processor names the labels it
can emit (``spec``, a :class:`PreProcessorSpec`) and turns a batch of decoded images into detections
(``detect``, see :class:`PreProcessor`). It declares the ``pre_processor_params`` it reads by
subclassing :class:`CommonParams` (defined in :mod:`totask_ray.serving.params`, importable from here).

What the callers do with a pre-processor lives beside this module:
:mod:`~totask_ray.serving.validation` checks everything a model returns before it can reach a task, so
a model that emits a box outside its image or a NaN score fails loudly with the image and item at
fault instead of writing garbage into a labeling platform; :mod:`~totask_ray.serving.postprocess`
applies the common params (NMS included); :mod:`~totask_ray.serving.params_check` refuses params at
prepare.

This module imports neither Ray nor any model, so a plugin author (or a benchmark) can run a
pre-processor in one plain Python process.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from totask_ray.serving.params import CommonParams, InferenceParams, ModelSettings, PostProcessing

__all__ = [
    "CommonParams",
    "Detection",
    "InferenceParams",
    "ModelSettings",
    "PostProcessing",
    "PreProcessor",
    "PreProcessorInputError",
    "PreProcessorOutputError",
    "PreProcessorSpec",
]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Point = tuple[FiniteFloat, FiniteFloat]


class Detection(BaseModel):
    """One object found in one image; coordinates are pixels of the image the model was given."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1)
    class_id: int = Field(ge=0)
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    bbox: tuple[FiniteFloat, FiniteFloat, FiniteFloat, FiniteFloat]
    polygon: list[Point] | None = None
    text: str | None = None

    @field_validator("bbox")
    @classmethod
    def _positive_size(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        # A zero-area box cannot be drawn or edited by an annotator.
        if v[2] <= 0 or v[3] <= 0:
            raise ValueError(f"width and height must be > 0, got [x, y, width, height] = {list(v)}")
        return v

    @field_validator("polygon")
    @classmethod
    def _enough_points(cls, v: list[Point] | None) -> list[Point] | None:
        if v is not None and len(v) < 3:
            raise ValueError(f"a polygon needs at least 3 points, got {len(v)}")
        return v


class PreProcessorSpec(BaseModel):
    """What a pre-processor is, which labels it can emit (``class_id -> label``) and what it accepts.

    ``params`` (a :class:`CommonParams` subclass) declares the ``pre_processor_params`` the app reads;
    without it only the common keys are checked and everything else is passed through unreported.
    ``devices`` is where the model can run (``None``: not declared). ``honours_batch_size`` is true for
    every app on the shared deployment, which chunks model calls by ``model_config.batch_size``; an app
    that cannot sets it false, and the key is then refused rather than silently ignored.

    ``payload`` is what a batched call carries to the replica. ``"encoded"`` (the default): the image
    file's bytes, checked by the annotator from the header and decoded on the replica, beside the
    model; a call then moves about what the file weighs instead of its pixels (a 512x512 JPEG ~50 kB
    against a 0.8 MB array). ``"decoded"``: the annotators decode and send RGB arrays, as before;
    for a replica whose reserved CPUs are too few to decode at the model's pace (a fast GPU model on
    one CPU), where the annotators' CPUs are the spare ones and the bytes are worth moving.

    ``input`` is what ``detect`` receives: ``"arrays"`` (the default: decoded HxWx3 uint8 RGB, the
    contract below) or ``"encoded"`` (:class:`~totask_ray.net.images.EncodedImage`, for a model that
    decodes itself, on a GPU say); the replica's wrapper decodes for an ``"arrays"`` model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    labels: dict[int, str]
    params: type[CommonParams] | None = None
    # Where the model can run; "auto" is a request, not a place.
    devices: tuple[Literal["cpu", "cuda"], ...] | None = Field(None, min_length=1)
    honours_batch_size: bool = True
    payload: Literal["encoded", "decoded"] = "encoded"
    input: Literal["arrays", "encoded"] = "arrays"

    @model_validator(mode="after")
    def _encoded_input_needs_an_encoded_payload(self) -> PreProcessorSpec:
        if self.input == "encoded" and self.payload == "decoded":
            raise ValueError(
                "input='encoded' takes the file's bytes, which payload='decoded' no longer sends: "
                "leave payload at 'encoded'"
            )
        return self

    @field_validator("params")
    @classmethod
    def _declared_strictly(cls, v: type[CommonParams] | None) -> type[CommonParams] | None:
        if v is None:
            return v
        if v.model_config.get("extra") != "forbid":
            raise ValueError(f"{v.__name__} must keep extra='forbid': it declares every key the app reads")
        required = [name for name, f in v.model_fields.items() if f.is_required()]
        if required:
            raise ValueError(
                f"{v.__name__}: every param is optional per call; give {', '.join(required)} a default"
            )
        return v


class PreProcessorOutputError(ValueError):
    """A model returned something that is not a valid list of detections per image."""


class PreProcessorInputError(ValueError):
    """An image handed to a pre-processor is not HxWx3 uint8 RGB."""


@runtime_checkable
class PreProcessor(Protocol):
    """A model that pre-annotates images.

    ``detect(images, params)`` receives a batch of HxWx3 ``uint8`` RGB arrays (or, where
    ``spec.input`` is ``"encoded"``, :class:`~totask_ray.net.images.EncodedImage` whose ``shape`` is
    the decoded one) and must return:

    - a list with exactly one entry per input image, in input order;
    - each entry a list (possibly empty) of :class:`Detection`;
    - ``bbox`` as ``[x, y, width, height]`` in pixels of that input image, ``width`` and ``height``
      > 0, the box inside the image (up to :data:`~totask_ray.serving.validation.BBOX_TOLERANCE_PX` of rounding);
    - ``polygon`` (optional) with at least 3 ``[x, y]`` points, also inside the image;
    - ``score`` a finite float in ``[0, 1]`` (higher is more confident);
    - ``class_id``/``label`` a pair from ``spec.labels``;
    - ``params`` honoured: :func:`~totask_ray.serving.postprocess.apply_params` implements the common keys (NMS included); the
      shared deployment chunks model calls by ``model_config.batch_size``; ``model_config.device``
      is the app's to honour, within ``spec.devices``; extra keys are the app's own options,
      declared by ``spec.params``.

    Implementations must be usable without Ray (so they can be benchmarked in one process) and must
    not download anything at run time: weights come from installed packages.
    """

    @property
    def spec(self) -> PreProcessorSpec: ...

    def detect(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]: ...
