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


def _run_command():
    import typer

    from totask_ray.cli import app

    return typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]


def test_the_cli_takes_each_flagged_option_with_its_description_as_help():
    params = {opt: p for p in _run_command().params for opt in p.opts}
    from totask_ray.pipeline.spec import cli_flags

    flagged = cli_flags()
    assert {"dry_run", "resume", "job_id", "verbose_ray", "stop_timeout_s"} <= set(flagged)
    for name, flag in flagged.items():
        description = RunOptions.model_fields[name].description
        assert f"--{flag}" in params, (
            f"RunOptions.{name} names --{flag}, which `totask-ray run` does not take"
        )
        assert params[f"--{flag}"].help == description, (
            f"--{flag}'s help is not RunOptions.{name}'s description"
        )
    from totask_ray.platform.connect import KINDS

    for kind in KINDS:
        for option in kind.options:
            assert f"--{option.flag}" in params, f"{kind.name}'s --{option.flag} is missing from `run`"


def test_a_flag_of_another_platform_is_refused_not_ignored(tmp_path):
    from typer.testing import CliRunner

    from totask_ray.cli import app

    job = tmp_path / "job.json"
    job.write_text('{"name": "Flags", "project": 1, "target_specification_name": "annotation_data"}')
    args = ["run", str(job), "--platform", "label-studio", "--host", "http://127.0.0.1:9", "--token", "k"]
    got = CliRunner().invoke(app, [*args, "--tenant", "acme"])
    assert got.exit_code == 1, got.output
    assert "--tenant is a Synapse option; this run is on Label Studio (--platform label-studio)" in got.output


@pytest.mark.usefixtures("ray_cluster")
def test_a_wrong_token_says_which_variable_to_set(platform):
    """A 401 names the variable and what it should hold, and never the token it was given."""
    from totask_ray import ToTaskError
    from totask_ray.platform.synapse.client import SynapseConfig

    wrong = "not-the-token-0123456789"
    params = {"name": "Wrong_Token", "project": 1, "target_specification_name": "annotation_data"}
    with pytest.raises(ToTaskError) as err:
        run_to_task(params, platform=SynapseConfig(host=platform.url, access_token=wrong), progress_bar=False)
    message = str(err.value)
    assert "HTTP 401" in message and wrong not in message
    assert (
        "check SYNAPSE_ACCESS_TOKEN (or --token): an access token of the platform at SYNAPSE_HOST" in message
    )


@pytest.mark.usefixtures("ray_cluster")
def test_a_fixed_pool_that_leaves_no_room_to_read_is_refused_at_once(platform):
    """The suite's Ray has 4 CPUs: 8 actors of 0.5 would take all of them and leave none for the
    reads that feed them (Ray Data then waits out its no-progress timeout). The run is refused when
    the pool is planned, saying how many fit, and nothing is written."""
    from helpers import config_for, good_unit, make_project

    from totask_ray import ToTaskError
    from totask_ray.result import RunStatus

    units = [good_unit(platform, i, "roomless") for i in range(20)]
    project, ids = make_project(platform, units)
    params = {"name": "No_Room", "project": project, "target_specification_name": "annotation_data"}
    try:
        result = run_to_task(params, platform=config_for(platform), num_actors=8, progress_bar=False)
        message, failed = result.message, result.status is RunStatus.FAILED
    except ToTaskError as exc:
        message, failed = str(exc), True
    assert failed, message
    assert "--num-actors 8 at 0.5 CPU each does not fit" in message and "at most 7 such actors" in message
    assert platform.store.history_counts(task_ids=ids) == {}
