"""The pre-processor contract: detections, params and output validation, without Ray or models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from totask_ray.serving.interface import (
    Detection,
    PreProcessor,
    PreProcessorInputError,
    PreProcessorOutputError,
    PreProcessorSpec,
)
from totask_ray.serving.params import InferenceParams
from totask_ray.serving.postprocess import apply_params
from totask_ray.serving.validation import validate_images, validate_output

IMG = np.zeros((100, 200, 3), np.uint8)  # height 100, width 200


def det(score=0.9, bbox=(10, 10, 20, 20), label="face", class_id=0, **kw) -> dict:
    return {"label": label, "class_id": class_id, "score": score, "bbox": list(bbox), **kw}


def test_detection_rejects_bad_fields():
    with pytest.raises(ValidationError):
        Detection(**det(score=1.5))
    with pytest.raises(ValidationError):
        Detection(**det(score=math.nan))
    with pytest.raises(ValidationError):
        Detection(**det(bbox=(0, 0, 0, 5)))
    with pytest.raises(ValidationError):
        Detection(**det(bbox=(0, 0, 5)))
    with pytest.raises(ValidationError):
        Detection(**det(polygon=[[0, 0], [1, 1]]))
    with pytest.raises(ValidationError):
        Detection(**det(extra_key=1))


def test_validate_output_accepts_dicts_and_detections_and_tolerates_rounding():
    out = validate_output(
        [IMG, IMG],
        [[det(bbox=(-0.4, 0, 200.3, 100.2)), Detection(**det())], []],
        labels={0: "face"},
    )
    assert [len(x) for x in out] == [2, 0]
    assert all(isinstance(d, Detection) for d in out[0])


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"x": 1}, "expected a list with one list of detections per image"),
        ([[]], "2 images, 1 lists"),
        ([[], "nope"], "image 1: expected a list of detections"),
        ([[], [det(), det(score=2.0)]], "image 1, detection 1, field 'score'"),
        ([[], [det(), det(bbox=(190, 10, 20, 20))]], "image 1, detection 1, field 'bbox'"),
        ([[det(bbox=(0, 90, 20, 20))], []], "image 0, detection 0, field 'bbox'"),
        ([[det(polygon=[[0, 0], [300, 0], [0, 5]])], []], "image 0, detection 0, field 'polygon.1'"),
        ([[det(score=float("inf"))], []], "image 0, detection 0, field 'score'"),
        ([[det(class_id=3)], []], "image 0, detection 0, field 'class_id'"),
        ([[det(label="cat")], []], "image 0, detection 0, field 'label'"),
        ([[42], []], "image 0, detection 0: expected a Detection or a mapping"),
    ],
)
def test_validate_output_names_image_item_and_field(raw, fragment):
    with pytest.raises(PreProcessorOutputError) as info:
        validate_output([IMG, IMG], raw, labels={0: "face"})
    assert fragment in str(info.value)


def test_validate_images():
    assert len(validate_images([IMG])) == 1
    for bad in ([np.zeros((4, 4), np.uint8)], [np.zeros((4, 4, 4), np.uint8)], [np.zeros((4, 4, 3))], ["x"]):
        with pytest.raises(PreProcessorInputError, match="image 0"):
            validate_images(bad)


def test_params_defaults_alias_and_extras():
    p = InferenceParams()
    assert (p.confidence_threshold, p.class_filter, p.max_objects, p.min_object_size) == (
        0.0,
        None,
        None,
        None,
    )
    p = InferenceParams.model_validate({"threshold": 0.4, "min_neighbors": 3})
    assert p.confidence_threshold == 0.4 and p.extras == {"min_neighbors": 3}
    for bad in ({"confidence_threshold": 1.2}, {"max_objects": 0}, {"min_object_size": -1}):
        with pytest.raises(ValidationError):
            InferenceParams.model_validate(bad)


def test_apply_params():
    dets = [
        Detection(**det(score=0.2, bbox=(0, 0, 50, 50))),
        Detection(**det(score=0.9, bbox=(0, 0, 5, 50))),
        Detection(**det(score=0.6, bbox=(0, 0, 30, 30), label="text", class_id=1)),
        Detection(**det(score=0.8, bbox=(0, 0, 40, 40))),
    ]
    scores = lambda ds: [d.score for d in ds]  # noqa: E731
    assert scores(apply_params(dets, InferenceParams(confidence_threshold=0.5))) == [0.9, 0.6, 0.8]
    assert scores(apply_params(dets, InferenceParams(class_filter=[1]))) == [0.6]
    assert scores(apply_params(dets, InferenceParams(class_filter=["face"]))) == [0.2, 0.9, 0.8]
    assert scores(apply_params(dets, InferenceParams(min_object_size=10))) == [0.2, 0.6, 0.8]
    # the two best, in their original order
    assert scores(apply_params(dets, InferenceParams(max_objects=2))) == [0.9, 0.8]
    assert scores(apply_params(dets, InferenceParams())) == [0.2, 0.9, 0.6, 0.8]


def test_protocol_is_structural():
    class Dummy:
        spec = PreProcessorSpec(name="dummy", labels={0: "x"})

        def detect(self, images, params):
            return [[] for _ in images]

    assert isinstance(Dummy(), PreProcessor)
