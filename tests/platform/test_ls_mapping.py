"""The Label Studio mapping rules on their own (no server): labeling configs, object conversion,
task filters, and how a token is sent. What the server makes of them is in test_label_studio_runs."""

from __future__ import annotations

import json

import pytest

from totask_ray.platform.errors import PlatformFilterError
from totask_ray.platform.label_studio.config import LabelStudioConfig
from totask_ray.platform.label_studio.convert import ConversionError, to_results
from totask_ray.platform.label_studio.filters import to_query
from totask_ray.platform.label_studio.labeling import LabelingConfigError, parse_labeling_config

OCR = """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image"><Label value="Text"/></Labels>
  <RectangleLabels name="bbox" toName="image"><Label value="text"/></RectangleLabels>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true"/>
</View>"""


def test_labeling_config_names_the_image_key_controls_and_labels():
    cfg = parse_labeling_config(OCR)
    assert cfg.image_key == "ocr"
    assert cfg.labels == ["text"]  # a bare <Labels> is no tool totask-ray writes to
    assert cfg.control_for("bbox", "text").name == "bbox"
    assert cfg.control_for("polygon", "text") is None
    assert cfg.text_control("image").name == "transcription"


@pytest.mark.parametrize(
    "text, wanted",
    [
        ("", "no labeling config"),
        ("<View><Text name='t' value='$text'/></View>", "no <Image>"),
        ("<View><Image", "not valid XML"),
        ('<!DOCTYPE x [<!ENTITY a "b">]><View/>', "DOCTYPE"),
    ],
)
def test_a_labeling_config_without_an_image_is_refused(text, wanted):
    with pytest.raises(LabelingConfigError, match=wanted):
        parse_labeling_config(text)


def test_ocr_text_goes_to_the_per_region_textarea_with_the_same_region():
    cfg = parse_labeling_config(OCR)
    data = {
        "objects": [
            {
                "id": "w1",
                "class_id": 0,
                "type": "bbox",
                "coordinates": {"x": 50, "y": 25, "width": 100, "height": 10},
                "properties": {"label": "text", "text": "HELLO", "confidence": 0.9},
            }
        ]
    }
    results, score = to_results(data, cfg, {0: "text"}, (500, 250))
    box, text = results
    assert box["type"] == "rectanglelabels" and box["value"]["rectanglelabels"] == ["text"]
    assert (box["value"]["x"], box["value"]["y"], box["value"]["width"]) == (10.0, 10.0, 20.0)
    assert text["type"] == "textarea" and text["id"] == box["id"] and text["value"]["text"] == ["HELLO"]
    assert text["value"]["x"] == box["value"]["x"] and score == 0.9


def test_an_object_the_config_cannot_hold_fails_with_the_controls_listed():
    cfg = parse_labeling_config(OCR)
    line = {"id": "l1", "class_id": 0, "type": "polyline", "coordinates": {"points": [[0, 0], [1, 1]]}}
    with pytest.raises(ConversionError, match="no control of the labeling config takes it"):
        to_results({"objects": [line]}, cfg, {0: "text"}, (10, 10))
    box = {"id": "b", "class_id": 7, "type": "bbox", "coordinates": {"x": 0, "y": 0, "width": 1, "height": 1}}
    with pytest.raises(ConversionError, match="labelled None"):
        to_results({"objects": [box]}, cfg, {0: "text"}, (10, 10))
    with pytest.raises(ConversionError, match="size is unknown"):
        to_results({"objects": [{**box, "class_id": 0}]}, cfg, {0: "text"}, None)


def test_filters_map_to_data_manager_items():
    q = to_query(
        {"has_predictions": False, "id__gte": 5, "created_at__lt": "2026-01-02T03:04:05Z", "limit": 9}
    )
    body = json.loads(q.query)
    items = {(i["filter"], i["operator"]): i["value"] for i in body["filters"]["items"]}
    assert items == {
        ("filter:tasks:total_predictions", "equal"): 0,
        ("filter:tasks:id", "greater_or_equal"): 5,
        ("filter:tasks:created_at", "less"): "2026-01-02T03:04:05.000000Z",
    }
    assert q.limit == 9 and body["ordering"] == ["tasks:id"]
    assert json.loads(to_query({"id__in": [3, 4]}).query)["selectedItems"] == {
        "all": False,
        "included": [3, 4],
    }


@pytest.mark.parametrize(
    "filters, wanted",
    [
        ({"status": "pending"}, "cannot filter tasks by 'status'"),
        ({"has_predictions": "maybe"}, "true or false"),
        ({"id__gte": 1.5}, "whole number"),
        ({"created_at__gte": "yesterday"}, "ISO 8601"),
        ({"limit": 0}, "at least 1"),
        ({"id__in": []}, "non-empty list"),
    ],
)
def test_a_filter_that_cannot_be_mapped_is_refused(filters, wanted):
    with pytest.raises(PlatformFilterError, match=wanted):
        to_query(filters)


def test_a_personal_token_is_traded_and_a_legacy_key_is_sent_as_is():
    legacy = LabelStudioConfig(host="http://127.0.0.1:1", api_key="abc123")
    assert legacy.headers()["Authorization"] == "Token abc123"
    pat = LabelStudioConfig(host="http://127.0.0.1:1", api_key="aaa.bbb.ccc")
    assert pat.personal_token and "Authorization" not in pat.headers()
    assert "aaa.bbb.ccc" not in repr(pat) and "abc123" not in repr(legacy)
    assert pat.for_job("job_a").model_version == "job_a"
    assert pat.model_copy(update={"model_version": "v9"}).for_job("job_a").model_version == "v9"
