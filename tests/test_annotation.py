"""The task-data object model: what may be written, and messages that name the object and field."""

from __future__ import annotations

import pytest

from totask_ray.annotation import (
    AnnotationError,
    bbox,
    classification,
    keypoint,
    polygon,
    polyline,
    task_data,
    validate_task_data,
)


def box(**coords):
    return {
        "id": "b1",
        "class_id": 1,
        "type": "bbox",
        "coordinates": {"x": 1, "y": 2, "width": 3, "height": 4, **coords},
    }


def test_factories_make_valid_objects():
    data = task_data(
        [
            bbox("a", 1, 10, 20, 30, 40, label="person", confidence=0.9),
            polygon("b", 2, [(0, 0), (5, 0), (5, 5)], label="roof"),
            polyline("c", 3, [(0, 0), (9, 9)]),
            keypoint("d", 4, [(3, 3)]),
            classification("e", 5, label="cat", confidence=0.7),
        ],
        source="img.jpg",
    )
    assert validate_task_data(data) is data
    assert data["objects"][0]["properties"] == {"label": "person", "confidence": 0.9}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"objects": [box(width=0)]}, "objects[0] (id 'b1'): coordinates.width"),
        ({"objects": [box(x=-1)]}, "coordinates.x"),
        ({"objects": [box(x=float("nan"))]}, "finite"),
        ({"objects": [box(y=float("inf"))]}, "finite"),
        ({"objects": [{**box(), "coordinates": None}]}, "coordinates are required"),
        ({"objects": [{**box(), "type": "circle"}]}, "objects[0] (id 'b1').type"),
        ({"objects": [{**box(), "colour": "red"}]}, "colour: is not a known field"),
        ({"objects": [{**box(), "class_id": "x"}]}, "class_id"),
        ({"objects": [{**box(), "properties": {"confidence": 2}}]}, "confidence"),
        ({"objects": [box(), box()]}, "ids must be unique"),
        ({"objects": [polygon("p", 1, [(0, 0), (1, 1)])]}, "at least 3"),
        ({"objects": [{**classification("c", 1), "coordinates": {"x": 1}}]}, "takes no coordinates"),
        ({"objects": "x"}, "objects"),
        ({"foo": 1}, "no 'objects' list"),
        ([], "JSON array"),
        (None, "None"),
        ({}, "empty"),
    ],
)
def test_violations_are_named(data, words):
    with pytest.raises(AnnotationError) as info:
        validate_task_data(data)
    assert words in str(info.value)


def test_schema_any_takes_any_object_but_not_nan_or_arrays():
    assert validate_task_data({"annotations": {"boxes": []}}, "any") == {"annotations": {"boxes": []}}
    with pytest.raises(AnnotationError, match="JSON object"):
        validate_task_data([1, 2], "any")
    with pytest.raises(AnnotationError, match="finite"):
        validate_task_data({"score": float("nan")}, "any")
