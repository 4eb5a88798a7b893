"""`run_to_task` names every run option, with the same default as `RunOptions`, and documents it.

A keyword that drifted from its model (another default, a missing option, an undocumented one)
is what a user calling from a notebook would trip over first.
"""

from __future__ import annotations

import inspect

import pytest

from totask_ray import ParamsError, RunOptions, run_to_task

SIGNATURE = inspect.signature(run_to_task)


@pytest.mark.parametrize("name", sorted(RunOptions.model_fields))
def test_every_option_is_a_documented_keyword_with_the_models_default(name):
    assert name in SIGNATURE.parameters, f"run_to_task does not take {name}"
    param = SIGNATURE.parameters[name]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY
    field = RunOptions.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if default == []:  # a list option defaults to None in the signature (no shared mutable default)
        assert param.default is None
    else:
        assert param.default == default, f"{name}: {param.default!r} != RunOptions' {default!r}"
    assert name in (run_to_task.__doc__ or ""), f"run_to_task's docstring does not name {name}"
    assert field.description, f"RunOptions.{name} has no description"


def test_no_keyword_beyond_the_options():
    extra = set(SIGNATURE.parameters) - set(RunOptions.model_fields) - {"params", "platform", "action_cls"}
    assert not extra


def test_a_bad_option_is_refused_before_anything_runs_naming_the_option():
    params = {"name": "Bad_Option", "project": 1, "target_specification_name": "annotation_data"}
    with pytest.raises(ParamsError) as info:
        # no platform is reachable at this address: the option check must come first
        run_to_task(params, concurrency=0)
    assert "concurrency" in str(info.value)
