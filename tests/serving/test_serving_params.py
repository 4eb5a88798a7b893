"""pre_processor_params checked once at prepare: refused values, ignored keys, NMS; no Ray, no models."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from pydantic import Field

from serve_apps.faces.app import SPEC as FACES
from serve_apps.faces.app import FaceParams
from serve_apps.ocr.app import SPEC as OCR
from serve_apps.ocr.app import OCRParams
from totask_ray.serving.deployment import PreProcessorDeployment
from totask_ray.serving.interface import Detection, PreProcessorSpec
from totask_ray.serving.params import CommonParams, InferenceParams
from totask_ray.serving.params_check import ParamsRefused, app_options, check_params
from totask_ray.serving.postprocess import apply_params, iou, nms

GUIDE_PARAMS = {  # the user guide's own example, verbatim
    "confidence_threshold": 0.8,
    "nms_threshold": 0.5,
    "model_config": {"batch_size": 16, "device": "cuda", "use_fp16": True},
    "post_processing": {"nms_threshold": 0.5, "min_size": 10},
    "min_object_size": 10,
    "max_objects": 100,
    "include_masks": True,
    "output_format": "coco",
}
DETECTOR = PreProcessorSpec(name="detector", labels={0: "person", 1: "car", 2: "dog"})


def refused(spec, params, gpus=1.0, **kw) -> str:
    with pytest.raises(ParamsRefused) as info:
        check_params(spec, params, gpus_available=gpus, **kw)
    return str(info.value)


# ------------------------------------------------------------------ check_params


def test_declared_app_normalises_and_reports_every_ignored_key():
    checked = check_params(
        FACES, {"min_neighbors": "3", **GUIDE_PARAMS, "model_config": {}}, gpus_available=0
    )
    assert checked.params == {
        "confidence_threshold": 0.8,
        "nms_threshold": 0.5,
        "model_config": {},
        "post_processing": {"nms_threshold": 0.5},
        "min_object_size": 10.0,
        "max_objects": 100,
        "min_neighbors": 3,
    }
    assert checked.ignored == ("post_processing.min_size", "include_masks", "output_format")
    assert checked.warning == (
        "pre_processor_params: the pre-processor 'faces' does not read post_processing.min_size, "
        "include_masks, output_format; ignored"
    )
    assert checked.inference.iou_threshold == 0.5 and checked.inference.extras == {"min_neighbors": 3}


def test_threshold_alias_becomes_the_canonical_key():
    checked = check_params(FACES, {"threshold": 0.6}, gpus_available=0)
    assert checked.params == {"confidence_threshold": 0.6} and checked.ignored == ()
    assert checked.inference.confidence_threshold == 0.6
    both = check_params(FACES, {"threshold": 0.6, "confidence_threshold": 0.6}, gpus_available=0)
    assert both.params == {"confidence_threshold": 0.6}


def test_undeclared_app_checks_common_keys_and_passes_the_rest_as_given():
    params = {**GUIDE_PARAMS, "threshold": 0.8, "whatever": {"nested": [1, 2]}}
    checked = check_params(None, params, gpus_available=1)
    assert checked.params == params and checked.ignored == () and checked.warning is None
    assert checked.inference.batch_size == 16 and checked.inference.device == "cuda"
    assert "nms_threshold" in refused(None, {"post_processing": {"nms_threshold": 2}})


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        (
            {"confidence_threshold": 1.5},
            ["pre_processor_params.confidence_threshold:", "less than or equal to 1", "(got 1.5)", "0 to 1"],
        ),
        ({"threshold": -0.1}, ["pre_processor_params.threshold:", "greater than or equal to 0"]),
        ({"nms_threshold": "high"}, ["pre_processor_params.nms_threshold:", "valid number", "(got 'high')"]),
        ({"max_objects": 0}, ["pre_processor_params.max_objects:", "integer >= 1"]),
        ({"max_objects": True}, ["pre_processor_params.max_objects: expected a number, not a boolean"]),
        ({"min_object_size": -2}, ["pre_processor_params.min_object_size:", ">= 0"]),
        ({"model_config": {"batch_size": 0}}, ["pre_processor_params.model_config.batch_size:", ">= 1"]),
        ({"model_config": {"device": "tpu"}}, ["model_config.device:", "'cpu', 'cuda' or 'auto'", "'tpu'"]),
        ({"model_config": 5}, ["pre_processor_params.model_config: expected a mapping (got 5)"]),
        (
            {"post_processing": {"nms_threshold": 1.5}},
            ["pre_processor_params.post_processing.nms_threshold:"],
        ),
        ({"class_filter": [True]}, ["pre_processor_params.class_filter.0: not an accepted value (got True)"]),
        ({"scale_factor": 1.0}, ["pre_processor_params.scale_factor:", "greater than 1", "a number > 1"]),
        ({"max_side": 8}, ["pre_processor_params.max_side:", ">= 32"]),
        (
            {"threshold": 0.2, "confidence_threshold": 0.3},
            ["confidence_threshold is given twice (confidence_threshold and threshold)"],
        ),
        (
            {"nms_threshold": 0.3, "post_processing": {"nms_threshold": 0.6}},
            ["nms_threshold is given twice with different values"],
        ),
    ],
)
def test_bad_values_are_refused_naming_the_key_and_what_is_allowed(params, fragments):
    msg = refused(FACES, params)
    for fragment in fragments:
        assert fragment in msg, msg


def test_long_values_are_never_echoed():
    secret = "https://bucket.example/a.png?X-Amz-Signature=" + "f" * 200
    msg = refused(FACES, {"confidence_threshold": secret})
    assert "Signature" not in msg and "fff" not in msg and "(got a string of 245 characters)" in msg
    assert len(msg) < 200
    msg = refused(FACES, {"class_filter": ["x" * 500]})
    assert "xxx" not in msg and "a string of 500 characters is not a class of faces" in msg
    assert "a list of 2 items" in refused(None, [1, 2])


def test_class_filter_must_name_the_models_classes():
    assert check_params(DETECTOR, {"class_filter": ["car", 0]}, gpus_available=0).params == {
        "class_filter": ["car", 0]
    }
    assert check_params(DETECTOR, {"class_filter": "dog"}, gpus_available=0).inference.class_filter == ["dog"]
    msg = refused(DETECTOR, {"class_filter": ["cra", 7]})
    assert msg == (
        "pre_processor_params.class_filter: 'cra', 7 are not a class of detector (did you mean 'car'?); "
        "allowed: person (0), car (1), dog (2)"
    )
    assert "'cat' is not a class of faces; allowed: face (0)" in refused(FACES, {"class_filter": ["cat"]})
    # without a spec there are no labels to check against
    assert check_params(None, {"class_filter": ["cat"]}, gpus_available=0).params == {"class_filter": ["cat"]}


def test_cuda_needs_a_gpu_in_the_cluster_and_in_the_replica():
    cuda = {"model_config": {"device": "cuda"}}
    msg = refused(OCR, cuda, gpus=0)
    assert "this cluster has no GPU and its node types add none; use device: cpu" in msg
    assert msg.startswith("pre_processor_params.model_config.device:")
    assert "this cluster has no GPU" in refused(None, cuda, gpus=0)  # undeclared apps too
    assert "reserves no GPU per replica" in refused(OCR, cuda, gpus=2, gpus_per_replica=0)
    assert check_params(OCR, cuda, gpus_available=2, gpus_per_replica=1).inference.device == "cuda"
    for device in ("cpu", "auto"):
        assert (
            check_params(OCR, {"model_config": {"device": device}}, gpus_available=0).inference.device
            == device
        )


def test_an_app_refuses_a_device_it_cannot_run_on():
    assert refused(FACES, {"model_config": {"device": "cuda"}}, gpus=4) == (
        "pre_processor_params.model_config.device: faces runs on cpu only, not cuda; use device: cpu (or auto)"
    )
    assert (
        check_params(FACES, {"model_config": {"device": "auto"}}, gpus_available=4).inference.device == "auto"
    )


def test_batch_size_is_refused_by_an_app_that_cannot_honour_it():
    fixed = PreProcessorSpec(name="fixed", labels={0: "x"}, honours_batch_size=False)
    assert refused(fixed, {"model_config": {"batch_size": 4}}) == (
        "pre_processor_params.model_config.batch_size: fixed does not let a caller choose its batch size; "
        "remove the key"
    )
    assert (
        check_params(FACES, {"model_config": {"batch_size": 4}}, gpus_available=0).inference.batch_size == 4
    )


def test_empty_and_missing_params():
    for params in (None, {}):
        checked = check_params(FACES, params, gpus_available=0)
        assert checked.params == {} and checked.ignored == ()
        assert checked.inference == InferenceParams()
    # `model_config:` with nothing under it (YAML null) is an empty group, not a refusal
    checked = check_params(FACES, {"model_config": None, "post_processing": None}, gpus_available=0)
    assert checked.inference.batch_size is None and checked.inference.iou_threshold is None


# ------------------------------------------------------------------ NMS


def box(score, bbox, class_id=0, label="person") -> Detection:
    return Detection(label=label, class_id=class_id, score=score, bbox=bbox)


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)


def test_nms_is_greedy_class_wise_and_keeps_the_original_order():
    dets = [
        box(0.6, (1, 1, 10, 10)),  # overlaps the 0.9 box (IoU ~0.68): dropped
        box(0.9, (0, 0, 10, 10)),
        box(0.8, (1, 1, 10, 10), class_id=1, label="car"),  # same place, other class: kept
        box(0.7, (30, 30, 10, 10)),  # elsewhere: kept
        box(0.5, (5, 0, 10, 10)),  # IoU 0.33 with the 0.9 box
    ]
    assert [d.score for d in nms(dets, 0.5)] == [0.9, 0.8, 0.7, 0.5]
    assert [d.score for d in nms(dets, 0.3)] == [0.9, 0.8, 0.7]
    assert nms(dets, 1.0) == dets  # IoU never exceeds 1
    assert nms(nms(dets, 0.3), 0.3) == nms(dets, 0.3)  # idempotent: app and driver may both apply it
    assert nms([], 0.5) == []


def test_apply_params_runs_nms_between_the_filters_and_max_objects():
    dets = [
        box(0.99, (1, 1, 9, 9)),  # too small: dropped by min_object_size before it can suppress anything
        box(0.9, (0, 0, 10, 10)),
        box(0.85, (0, 0, 10, 11)),  # a duplicate of the 0.9 box
        box(0.8, (50, 50, 20, 20)),
        box(0.7, (80, 80, 20, 20)),
    ]
    scores = lambda ds: [d.score for d in ds]  # noqa: E731
    assert scores(apply_params(dets, InferenceParams(nms_threshold=0.5, min_object_size=10))) == [
        0.9,
        0.8,
        0.7,
    ]
    params = InferenceParams.model_validate(
        {"post_processing": {"nms_threshold": 0.5}, "min_object_size": 10, "max_objects": 2}
    )
    assert scores(apply_params(dets, params)) == [0.9, 0.8]  # not [0.9, 0.85]: duplicates go first
    assert scores(apply_params(dets, InferenceParams())) == [0.99, 0.9, 0.85, 0.8, 0.7]
    assert scores(apply_params(dets, InferenceParams(nms_threshold=0.5))) == [0.99, 0.8, 0.7]


# ------------------------------------------------------------------ the apps' declarations


def test_shipped_specs_declare_their_params():
    assert FACES.params is FaceParams and FACES.devices == ("cpu",)
    assert OCR.params is OCRParams and OCR.devices == ("cpu", "cuda")
    assert set(FaceParams.model_fields) - set(CommonParams.model_fields) == {
        "scale_factor",
        "min_neighbors",
        "min_size",
        "max_side",
    }
    assert set(OCRParams.model_fields) - set(CommonParams.model_fields) == {
        "text_score",
        "box_thresh",
        "unclip_ratio",
        "use_cls",
    }
    checked = check_params(
        OCR, {"use_cls": "false", "text_score": 0.7, "scale_factor": 1.2}, gpus_available=0
    )
    assert checked.params == {"use_cls": False, "text_score": 0.7} and checked.ignored == ("scale_factor",)
    assert "pre_processor_params.unclip_ratio:" in refused(OCR, {"unclip_ratio": 0})


def test_app_options_checks_the_apps_own_keys_at_the_replica():
    assert app_options(InferenceParams.model_validate({"max_side": "512", "x": 1}), FaceParams) == {
        "max_side": 512
    }
    assert app_options(InferenceParams.model_validate({"max_side": None}), FaceParams) == {}
    with pytest.raises(ValueError, match=re.escape("param 'scale_factor': Input should be greater than 1")):
        app_options(InferenceParams.model_validate({"scale_factor": 0.5}), FaceParams)


def test_a_params_model_must_be_strict_and_optional():
    class Loose(CommonParams):
        model_config = {"extra": "allow"}

    class Required(CommonParams):
        must: int = Field()

    with pytest.raises(ValueError, match="must keep extra='forbid'"):
        PreProcessorSpec(name="x", labels={0: "x"}, params=Loose)
    with pytest.raises(ValueError, match="give must a default"):
        PreProcessorSpec(name="x", labels={0: "x"}, params=Required)


def test_runtime_params_tolerate_other_apps_keys():
    p = InferenceParams.model_validate(
        {"model_config": {"use_fp16": True, "batch_size": 2}, "post_processing": {}}
    )
    assert p.batch_size == 2 and p.iou_threshold is None


# ------------------------------------------------------------------ the shared deployment honours model_config


class Counting:
    spec = PreProcessorSpec(name="counting", labels={0: "x"}, devices=("cpu",))

    def __init__(self) -> None:
        self.calls: list[int] = []

    def detect(self, images, params):
        self.calls.append(len(images))
        return [[] for _ in images]


def test_deployment_chunks_model_calls_by_batch_size_and_refuses_a_device():
    dep = PreProcessorDeployment(Counting, max_batch_size=8)
    images = [np.zeros((4, 4, 3), np.uint8)] * 7
    assert asyncio.run(dep.predict(images, {"model_config": {"batch_size": 3}})) == [[]] * 7
    assert asyncio.run(dep.predict(images, {})) == [[]] * 7
    assert dep.model.calls == [3, 3, 1, 7]
    with pytest.raises(ValueError, match="counting runs on cpu only, not cuda"):
        asyncio.run(dep.predict(images, {"model_config": {"device": "cuda"}}))
