"""JSON schemas of the KubeRay v1 (and core v1) fields the rendered manifests use.

``kuberay-v1.json`` follows ray-project/kuberay v1.7.0 ``ray-operator/apis/ray/v1/*_types.go`` (every
field it lists exists since KubeRay v1.2), strict about unknown keys. It checks names, nesting and
types; it cannot check KubeRay's CEL rules, its webhook, or the operator's own Go validation.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "kuberay-v1.json"


@cache
def root() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def schema_for(kind: str) -> dict[str, Any]:
    """The schema of one kind (``RayJob``, ``ConfigMap``, ...), its ``$defs`` resolvable."""
    schema = root()
    if kind not in schema["kinds"]:
        raise KeyError(f"no schema for kind {kind!r}; known: {', '.join(sorted(schema['kinds']))}")
    return {"$schema": schema["$schema"], "$defs": schema["$defs"], **schema["kinds"][kind]}
