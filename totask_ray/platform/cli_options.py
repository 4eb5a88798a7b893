"""A platform setting the CLI takes: each platform declares its own beside its config, and
`platform.connect` lists them per platform, so `totask-ray run --help` and the mapping from a flag to
a setting come from one declaration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CliOption:
    flag: str  # `--<flag>`; two platforms may share one (`--host`), each filling its own setting
    setting: str  # the config field it fills
    help: str
    env: str | None = None  # the variable that gives it when the flag is left out
    multiple: bool = False  # repeatable: the values come as a list
    parse: Callable[[Any], Any] | None = None  # from what was typed to the setting's value
