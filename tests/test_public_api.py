"""What users touch is importable from `totask_ray` itself: what a caller runs and catches, and
what a plugin author implements, each the same object as where it lives."""

from __future__ import annotations

import importlib

import pytest

import totask_ray

CALLER = {"run_to_task", "RunOptions", "ToTaskParams", "ToTaskResult", "ToTaskError", "RunStopped"}
CATCHES = {"ToTaskError", "PlatformError", "ParamsError", "RunStopped"}
PLUGIN_AUTHOR = {"ToTask", "Detection", "PreProcessor", "PreProcessorSpec", "CommonParams", "InferenceParams"}


@pytest.mark.parametrize("name", sorted(totask_ray.__all__))
def test_each_public_name_is_the_object_where_it_lives(name):
    home = importlib.import_module(totask_ray._EXPORTS[name])
    assert getattr(totask_ray, name) is getattr(home, name)


def test_what_callers_and_plugin_authors_use_is_public():
    missing = (CALLER | CATCHES | PLUGIN_AUTHOR) - set(totask_ray.__all__)
    assert not missing, f"not importable from totask_ray: {sorted(missing)}"
    for name in CATCHES:
        assert issubclass(getattr(totask_ray, name), BaseException)
