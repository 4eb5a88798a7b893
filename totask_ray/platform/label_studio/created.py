"""What a write created on Label Studio, for the run's ledger: the prediction's or annotation's id
and a digest of its stored result, so an undo deletes exactly it, and only while it is as written.

The digest covers what a person changes (each region's `from_name`, `to_name`, `type` and `value`,
floats to 4 decimals), not what Label Studio may add on its own (ids, `origin`, scores).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def result_digest(result: Any) -> str:
    regions = [
        {k: _round(r.get(k)) for k in ("from_name", "to_name", "type", "value")}
        for r in (result if isinstance(result, list) else [])
        if isinstance(r, dict)
    ]
    canon = sorted(json.dumps(r, sort_keys=True, separators=(",", ":")) for r in regions)
    return hashlib.blake2b("\n".join(canon).encode(), digest_size=16).hexdigest()


def prediction_of(raw: dict[str, Any], model_version: str | None) -> dict[str, Any] | None:
    """The task's prediction of `model_version` as created info (the newest, where several)."""
    mine = [
        p
        for p in raw.get("predictions") or []
        if isinstance(p, dict) and p.get("model_version") == model_version and isinstance(p.get("id"), int)
    ]
    if not mine:
        return None
    p = max(mine, key=lambda p: p["id"])
    return {"kind": "prediction", "id": p["id"], "digest": result_digest(p.get("result"))}


def annotation_created(answer: dict[str, Any]) -> dict[str, Any] | None:
    aid = answer.get("id")
    if not isinstance(aid, int):
        return None
    return {"kind": "annotation", "id": aid, "digest": result_digest(answer.get("result"))}
