"""A project's labeling config, read for what a run needs: the image's data key, the controls
that may receive each kind of object, and the labels they allow.

The labels become the project's classes (`ProjectClass`, ids in config order), so the label
mapping that guards the Synapse path (a model label that matches no class is refused at prepare)
guards this one too.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

# control tag (lower case) -> the object kinds of the task-data model it takes
CONTROL_KINDS: dict[str, tuple[str, ...]] = {
    "rectanglelabels": ("bbox",),
    "polygonlabels": ("polygon",),
    "keypointlabels": ("keypoint",),
    "choices": ("classification",),
    "textarea": (),  # OCR text, per region
}
OBJECT_TAGS = ("image",)
MAX_CONFIG_CHARS = 1_000_000


class LabelingConfigError(ValueError):
    """A labeling config this run cannot use; the message says what is missing."""


@dataclass(frozen=True)
class Control:
    tag: str  # lower case: rectanglelabels, polygonlabels, ...
    name: str
    to_name: str
    labels: tuple[str, ...] = ()
    per_region: bool = False

    @property
    def result_type(self) -> str:
        return self.tag


@dataclass(frozen=True)
class LabelingConfig:
    """The parts of a labeling config a run converts to."""

    images: dict[str, str]  # object name -> task data key ($image -> "image")
    controls: tuple[Control, ...] = field(default_factory=tuple)

    @property
    def image_key(self) -> str | None:
        """The data key of the first image: where a task's primary image URL lives."""
        return next(iter(self.images.values()), None)

    @property
    def labels(self) -> list[str]:
        """Every label a control offers, in config order, each once: the project's classes."""
        seen: dict[str, None] = {}
        for c in self.controls:
            for label in c.labels:
                seen.setdefault(label, None)
        return list(seen)

    def control_for(self, kind: str, label: str | None) -> Control | None:
        """The control that takes an object of `kind` with `label` (one that lists the label first,
        then one that lists no labels); None when the config has none."""
        fits = [c for c in self.controls if kind in CONTROL_KINDS.get(c.tag, ()) and c.to_name in self.images]
        for c in fits:
            if label is not None and label in c.labels:
                return c
        return next((c for c in fits if not c.labels), None)

    def text_control(self, to_name: str) -> Control | None:
        return next((c for c in self.controls if c.tag == "textarea" and c.to_name == to_name), None)


def parse_labeling_config(text: str) -> LabelingConfig:
    if not isinstance(text, str) or not text.strip():
        raise LabelingConfigError("the project has no labeling config; set one in the project's settings")
    if len(text) > MAX_CONFIG_CHARS:
        raise LabelingConfigError("the labeling config is too large to read")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise LabelingConfigError("the labeling config declares a DOCTYPE or entities, which are not read")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise LabelingConfigError(f"the labeling config is not valid XML: {exc}") from None
    images: dict[str, str] = {}
    controls: list[Control] = []
    for el in root.iter():
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        name = el.get("name")
        if tag in OBJECT_TAGS and name:
            value = el.get("value") or ""
            if value.startswith("$") and len(value) > 1:
                images[name] = value[1:]
        elif tag in CONTROL_KINDS and name and el.get("toName"):
            labels = tuple(
                v
                for child in el
                if isinstance(child.tag, str) and child.tag.lower() in ("label", "choice")
                for v in [child.get("value") or child.get("alias")]
                if v
            )
            per_region = (el.get("perRegion") or "").lower() == "true"
            to_name = el.get("toName", "").split(",")[0].strip()
            controls.append(Control(tag, name, to_name, labels, per_region))
    if not images:
        raise LabelingConfigError(
            "the labeling config has no <Image> with a value such as $image; totask-ray pre-annotates images"
        )
    return LabelingConfig(images, tuple(controls))
