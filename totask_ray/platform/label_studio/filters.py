"""A job's `task_filters` as a Label Studio Data Manager query.

Only what maps exactly is accepted; any other filter is refused with the list of those that
work, never ignored (ignoring one would run the job on tasks the user did not mean).

| task_filters | Data Manager |
|---|---|
| `has_predictions: false/true` | `filter:tasks:total_predictions` equal 0 / greater 0 |
| `has_annotations: false/true` (alias `is_labeled`) | `filter:tasks:total_annotations` equal 0 / greater 0 |
| `id__gte`, `id__gt`, `id__lte`, `id__lt` | `filter:tasks:id` greater_or_equal, greater, ... |
| `id__in: [..]` | `selectedItems: {all: false, included: [..]}` |
| `created_at__gte`, `created_at__lte` (ISO 8601) | `filter:tasks:created_at` |
| `limit: N` | at most the first N tasks, in id order |

A run reads the listing by id ranges (`IdRanges`): the Data Manager orders by `tasks:id` (or
`-tasks:id` for the highest id) and each range adds `filter:tasks:id` greater / less_or_equal
items, ANDed with the job's own. A job with `limit` is read by pages (a range would cut it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from totask_ray.platform.errors import PlatformFilterError

_RANGE_OPS = {"gte": "greater_or_equal", "gt": "greater", "lte": "less_or_equal", "lt": "less"}
_COUNTS = {
    "has_predictions": "total_predictions",
    "has_annotations": "total_annotations",
    "is_labeled": "total_annotations",
}
KNOWN = sorted(
    [*_COUNTS, *(f"id__{op}" for op in _RANGE_OPS), "id__in"]
    + [f"created_at__{op}" for op in ("gte", "gt", "lte", "lt")]
    + ["limit"]
)


@dataclass(frozen=True)
class TaskQuery:
    """The Data Manager query (`query=` of GET /api/tasks) and the job's limit."""

    query: str
    limit: int | None = None


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PlatformFilterError(f"task filter {key} takes true or false, not {value!r}")


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).lstrip("-").isdigit():
        raise PlatformFilterError(f"task filter {key} takes a whole number, not {value!r}")
    return int(value)


def _when(key: str, value: Any) -> str:
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PlatformFilterError(
            f"task filter {key} takes an ISO 8601 time such as 2026-01-31T00:00:00Z, not {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_query(
    filters: Mapping[str, Any],
    *,
    after: int | None = None,
    upto: int | None = None,
    descending: bool = False,
) -> TaskQuery:
    """The query for `filters`; `after` / `upto` bound the ids to `(after, upto]` and `descending`
    orders them highest first (an id range read, `IdRanges`)."""
    items: list[dict[str, Any]] = []
    selected: dict[str, Any] = {"all": True, "excluded": []}
    limit = None
    unknown = []
    for key, value in filters.items():
        field, _, op = key.partition("__")
        if key in _COUNTS:
            wanted = _bool(key, value)
            items.append(
                {
                    "filter": f"filter:tasks:{_COUNTS[key]}",
                    "operator": "greater" if wanted else "equal",
                    "type": "Number",
                    "value": 0,
                }
            )
        elif field == "id" and op in _RANGE_OPS:
            items.append(
                {
                    "filter": "filter:tasks:id",
                    "operator": _RANGE_OPS[op],
                    "type": "Number",
                    "value": _int(key, value),
                }
            )
        elif key == "id__in":
            values = value.split(",") if isinstance(value, str) else value
            if not isinstance(values, list | tuple) or not values:
                raise PlatformFilterError("task filter id__in takes a non-empty list of task ids")
            selected = {"all": False, "included": [_int(key, v) for v in values]}
        elif field == "created_at" and op in _RANGE_OPS:
            items.append(
                {
                    "filter": "filter:tasks:created_at",
                    "operator": _RANGE_OPS[op],
                    "type": "Datetime",
                    "value": _when(key, value),
                }
            )
        elif key == "limit":
            limit = _int(key, value)
            if limit < 1:
                raise PlatformFilterError("task filter limit takes a whole number of at least 1")
        else:
            unknown.append(key)
    if unknown:
        raise PlatformFilterError(
            f"Label Studio cannot filter tasks by {', '.join(repr(u) for u in unknown)}; "
            f"the filters it takes are: {', '.join(KNOWN)}"
        )
    for op, bound in (("greater", after), ("less_or_equal", upto)):
        if bound is not None:
            items.append({"filter": "filter:tasks:id", "operator": op, "type": "Number", "value": int(bound)})
    ordering = "-tasks:id" if descending else "tasks:id"
    query: dict[str, Any] = {"ordering": [ordering], "selectedItems": selected}
    if items:
        query["filters"] = {"conjunction": "and", "items": items}
    return TaskQuery(json.dumps(query, separators=(",", ":")), limit)
