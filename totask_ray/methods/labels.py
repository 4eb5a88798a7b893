"""A model's labels mapped to the project's classes, checked before the run and applied per task.

A model says `face`; the project may call it `Person` with class id 3. As in CVAT's
auto-annotation, labels match the project's classes by name unless the job maps them
(`label_map`), and a label that maps to nothing is refused at prepare with both lists shown,
instead of every task being written with class ids the project does not have. A job may choose to
drop such objects instead (`unmapped_labels: drop`). Scores and every other property stay on the
objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from totask_ray.params import UnmappedLabels
from totask_ray.platform.models import ProjectClass


class LabelMapError(ValueError):
    """The labels cannot be mapped; the message shows the model's labels and the project's classes."""


@dataclass(frozen=True)
class LabelMapping:
    """`model label -> (class id, class name)`; picklable, shipped to every annotator."""

    targets: Mapping[str, tuple[int, str]]
    classes: tuple[str, ...]
    drop_unmapped: bool

    @classmethod
    def build(
        cls,
        classes: Iterable[ProjectClass],
        model_labels: Iterable[str] | None,
        label_map: Mapping[str, str | int],
        policy: UnmappedLabels,
    ) -> LabelMapping | None:
        """The mapping for this job, or None when the project lists no classes (nothing to map to:
        objects are written with the model's own class ids, as before projects had classes)."""
        classes = list(classes)
        if not classes:
            if label_map:
                raise LabelMapError("label_map is set but the project lists no classes to map to")
            return None
        by_name = {c.name: c for c in classes}
        by_id = {c.id: c for c in classes}
        targets: dict[str, tuple[int, str]] = {}
        for label, target in label_map.items():
            found = by_id.get(target) if isinstance(target, int) else by_name.get(target)
            if found is None:
                raise LabelMapError(
                    f"label_map maps '{label}' to {target!r}, which is not a class of the project "
                    f"(its classes: {_names(classes)})"
                )
            targets[label] = (found.id, found.name)
        for c in classes:
            targets.setdefault(c.name, (c.id, c.name))
        mapping = cls(targets, tuple(c.name for c in classes), policy is UnmappedLabels.DROP)
        unmapped = [label for label in (model_labels or ()) if label not in targets]
        if unmapped and not mapping.drop_unmapped:
            raise LabelMapError(
                f"the model's labels {', '.join(repr(u) for u in unmapped)} match no class of the project. "
                f"Model labels: {', '.join(repr(m) for m in model_labels or ())}; project classes: "
                f"{_names(classes)}. Map them with label_map (e.g. {{{unmapped[0]}: {classes[0].name}}}) "
                "or set unmapped_labels: drop"
            )
        return mapping

    def apply(self, data: Any) -> Any:
        """Task data with each object's class id and label set from the project's classes."""
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            return data
        kept = []
        for obj in data["objects"]:
            if not isinstance(obj, dict):
                kept.append(obj)  # the validation after the hook says what is wrong with it
                continue
            props = obj.get("properties") if isinstance(obj.get("properties"), dict) else {}
            label = props.get("label")
            target = self.targets.get(label) if isinstance(label, str) else None
            if target is None:
                if self.drop_unmapped:
                    continue
                raise LabelMapError(
                    f"the pre-processor returned label {label!r}, which matches no class of the project "
                    f"({', '.join(self.classes)}); map it with label_map or set unmapped_labels: drop"
                )
            kept.append({**obj, "class_id": target[0], "properties": {**props, "label": target[1]}})
        return {**data, "objects": kept}


def _names(classes: list[ProjectClass]) -> str:
    return ", ".join(f"'{c.name}' (id {c.id})" for c in classes)
