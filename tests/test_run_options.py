"""`run_to_task` takes one `RunOptions` (or any of its fields as a keyword) and documents each option
from the model's own field descriptions: there is no second list of options to drift."""

from __future__ import annotations

import pytest

from totask_ray import ParamsError, RunOptions, run_to_task

PARAMS = {"name": "Bad_Option", "project": 1, "target_specification_name": "annotation_data"}


@pytest.mark.parametrize("name", sorted(RunOptions.model_fields))
def test_every_option_is_described_and_in_run_to_tasks_help(name):
    field = RunOptions.model_fields[name]
    assert field.description, f"RunOptions.{name} has no description"
    assert f"{name} (default " in (run_to_task.__doc__ or ""), f"help(run_to_task) does not list {name}"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"options": RunOptions(), "num_actor": 2}, "num_actor"),  # a misspelt option is refused
        ({"options": RunOptions(page_size=50), "page_size": 5000}, "page_size"),  # a keyword overrides
    ],
)
def test_a_bad_option_is_refused_before_anything_runs_naming_the_option(kwargs, named):
    with pytest.raises(ParamsError) as info:
        # no platform is reachable at this address: the option check must come first
        run_to_task(PARAMS, **kwargs)
    assert named in str(info.value)


def test_options_are_frozen_so_a_run_cannot_change_them_under_its_actors():
    options = RunOptions(num_actors=2)
    with pytest.raises(ValueError):
        options.num_actors = 3  # type: ignore[misc]
