"""The embedded platform's task workflow: stages a task moves through, one at a time.

As in Encord's workflows, tasks cannot "teleport": a status change may stay in the task's stage,
move to the next stage, or send it back one stage (a rejection), never skip one. `submit` moves a
task to the next stage.
"""

from __future__ import annotations

STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("annotation", ("pending", "in_progress")),
    ("review", ("in_review",)),
    ("complete", ("completed",)),
)
STATUSES: tuple[str, ...] = tuple(s for _, statuses in STAGES for s in statuses)


def stage_of(status: str) -> int | None:
    for i, (_, statuses) in enumerate(STAGES):
        if status in statuses:
            return i
    return None


def transition_error(current: str, new: str) -> str | None:
    """Why `current` → `new` is refused, or None when it is allowed."""
    to = stage_of(new)
    if to is None:
        return f"'{new}' is not a task status; use one of {', '.join(STATUSES)}"
    at = stage_of(current)
    if at is None or abs(to - at) <= 1:
        return None
    first_step = STAGES[at + 1][1][0] if to > at else STAGES[at - 1][1][0]
    return (
        f"a task cannot move from '{current}' ({STAGES[at][0]} stage) to '{new}' ({STAGES[to][0]} stage): "
        f"tasks move one stage at a time; move it to '{first_step}' first"
    )


def submitted_status(current: str) -> str | None:
    """The status `submit` gives a task: the first of the next stage (None when it is complete)."""
    at = stage_of(current)
    if at is None:
        return STAGES[0][1][0]
    if at + 1 >= len(STAGES):
        return None
    return STAGES[at + 1][1][0]
