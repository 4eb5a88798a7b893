"""The platform contract as the run meets it: each client implements the protocols it declares,
and what a platform does not have is refused by name before anything runs."""

from __future__ import annotations

import pytest

from totask_ray import LabelStudioConfig, SynapseConfig, ToTaskError, run_to_task
from totask_ray.platform.base import Agents, AsyncPlatform, JobRecords, Platform, TaskWorkflow
from totask_ray.platform.connect import KINDS

CONFIGS = {
    SynapseConfig: SynapseConfig(host="http://127.0.0.1:9", access_token="t"),
    LabelStudioConfig: LabelStudioConfig(host="http://127.0.0.1:9", api_key="k"),
}
PARAMS = {"name": "Contract", "project": 1, "target_specification_name": "annotation_data"}


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_every_client_implements_what_it_declares(kind):
    config = CONFIGS[kind.config]
    blocking, async_ = kind.blocking(config), kind.async_(config)
    try:
        assert isinstance(blocking, Platform) and isinstance(async_, AsyncPlatform)
        assert blocking.supports_workflow == isinstance(async_, TaskWorkflow), (
            f"{kind.name}: supports_workflow says {blocking.supports_workflow}, the async client disagrees"
        )
        assert isinstance(async_.needs_image_size, bool) and blocking.name
    finally:
        blocking.close()


def test_synapse_keeps_job_records_and_agents_label_studio_has_neither():
    synapse = KINDS[-1].blocking(CONFIGS[SynapseConfig])
    ls = KINDS[0].blocking(CONFIGS[LabelStudioConfig])
    assert isinstance(synapse, JobRecords) and isinstance(synapse, Agents)
    assert not isinstance(ls, JobRecords) and not isinstance(ls, Agents)
    for attr in (
        "create_job",
        "update_job",
        "post_logs",
        "get_agent",
        "run_plugin",
        "list_serve_applications",
    ):
        assert not hasattr(ls, attr), f"Label Studio's client stubs {attr}: it should not have it at all"


@pytest.mark.parametrize("option", [{"job_id": 5}, {"create_job": True}])
def test_a_job_record_on_label_studio_is_refused_by_name_before_anything_runs(option):
    # nothing listens on port 9: the refusal comes before the platform is asked anything
    with pytest.raises(ToTaskError) as err:
        run_to_task(PARAMS, platform=CONFIGS[LabelStudioConfig], progress_bar=False, **option)
    assert "Label Studio keeps no job records: leave out job_id / create_job (--job-id)" in str(err.value)
