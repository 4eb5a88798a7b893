"""What a run needs of a labeling platform, in small protocols, in the platform's own words.

The driver, the id source and the annotators speak to a platform only through these protocols, and
get one from `totask_ray.platform.connect`, the one place that picks the concrete client. Every
platform implements `Platform` (the blocking reads a run needs) and `AsyncPlatform` (the per-task
reads and writes of an annotator). What only some platforms have is a protocol of its own, which a
client implements or leaves out; nothing is stubbed to raise:
- `JobRecords`: a job record the run reports status, progress and logs to (Synapse);
- `Agents`: agents that deploy pre-processors onto their own Ray cluster (Synapse);
- `TaskWorkflow`: a task's status, assignee and stage (`on_success`; Synapse's async client);
- `IdRanges`: a listing read by id ranges (keyset: ordered by id, each page resuming after the last
  id read), where the platform orders by id and filters `id__gt` / `id__lte` (Label Studio's Data
  Manager always; a Synapse-contract server where it honours them: the embedded platform does).
`job_records(client)` and `agents(client)` hand a client over as the protocol, or refuse with a
message that names the platform and says what to leave out.

What differs by platform within a protocol is declared on the client, never guessed: `name` (how
messages call it), `needs_image_size` (an async client that stores coordinates relative to the
image; the annotator then passes `image_size` to `annotate_task`), `supports_workflow` (whether the
async client is a `TaskWorkflow`; a job with `on_success` is refused before anything runs), and
`media_headers(url)`, the credentials a file on the platform's own origin needs (none for Synapse's
signed URLs). A write takes the `Task` the annotator holds, so a client needs no side table to find
what it read earlier (Label Studio's project).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from totask_ray.platform.errors import PlatformError
from totask_ray.platform.models import Agent, DataCollection, DataUnit, Job, PluginRelease, Project, Task


@dataclass(frozen=True)
class TaskIdPage:
    """One page of a task listing: the total count, the ids on this page, and whether more follow."""

    count: int
    ids: list[int]
    next: str | None


@runtime_checkable
class Platform(Protocol):
    """Blocking reads every run makes: the driver's steps, the id source, pre-processor releases."""

    name: str  # how a message names the platform ("Synapse", "Label Studio")
    supports_workflow: bool  # its async client is a `TaskWorkflow` (`on_success`)

    def get_project(self, project_id: int) -> Project: ...
    def get_data_collection(self, collection_id: int) -> DataCollection: ...
    def count_tasks(self, project_id: int, filters: Mapping[str, Any]) -> int: ...
    def task_id_page(
        self, project_id: int, filters: Mapping[str, Any], *, page: int = 1, page_size: int | None = None
    ) -> TaskIdPage: ...
    def iter_task_ids(
        self, project_id: int, filters: Mapping[str, Any], page_size: int | None = None
    ) -> Iterator[int]: ...
    def get_plugin_release(self, release_id: int) -> PluginRelease: ...
    def close(self) -> None: ...


@runtime_checkable
class IdRanges(Protocol):
    """A listing read by id ranges instead of offset pages.

    Deep offset pages cost the server linear time each (it walks past every row before the page),
    and rows that leave or join the filters while a run reads shift every later page: tasks are
    skipped or listed twice. A range `(after, upto]` read in id order, each page resuming after the
    last id it got, costs the same at any depth and skips and repeats nothing while tasks are
    written under it.
    """

    def id_bounds(self, project_id: int, filters: Mapping[str, Any]) -> tuple[int, int] | None:
        """The lowest and highest matching ids, or None when this listing cannot be read by id
        ranges (the server does not honour the ordering or the id filters, or `filters` hold one
        that ranges would change, such as `limit`): the caller then reads offset pages."""
        ...

    def task_id_range_page(
        self,
        project_id: int,
        filters: Mapping[str, Any],
        *,
        after: int,
        upto: int,
        page_size: int | None = None,
    ) -> TaskIdPage:
        """The first page of matching ids in `(after, upto]`, in id order; `next` is set when more
        follow in the range (the next page is asked with `after` = the last id of this one)."""
        ...


def id_bounds(client: Platform, project_id: int, filters: Mapping[str, Any]) -> tuple[int, int] | None:
    """The listing's id bounds where `client` reads id ranges for these filters, else None."""
    if isinstance(client, IdRanges):
        return client.id_bounds(project_id, filters)
    return None


@runtime_checkable
class JobRecords(Protocol):
    """The platform's job record: a run reports its status, progress, result and logs there."""

    def create_job(self, body: dict[str, Any]) -> Job: ...
    def get_job(self, job_id: int) -> Job: ...
    def update_job(self, job_id: int, changes: dict[str, Any]) -> dict[str, Any]: ...
    def post_logs(self, events: list[dict[str, Any]]) -> Any: ...


@runtime_checkable
class Agents(Protocol):
    """Agents that deploy a pre-processor onto their own Ray cluster (`serving.lifecycle`)."""

    def get_agent(self, agent_id: int) -> Agent | None: ...
    def list_serve_applications(self, plugin_code: str, agent: int | None = None) -> Any: ...
    def run_plugin(self, code: str, body: dict[str, Any]) -> Any: ...


@runtime_checkable
class AsyncPlatform(Protocol):
    """Per-task calls the annotators make, many at a time on one event loop."""

    needs_image_size: bool  # `annotate_task` needs the primary image's (width, height)

    async def get_task(self, task_id: int) -> Task: ...
    async def get_data_unit(self, data_unit_id: int) -> DataUnit: ...
    async def annotate_task(
        self,
        task: Task,
        data: dict[str, Any],
        schema: str | None = None,
        *,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, Any]: ...
    async def media_headers(self, url: str) -> dict[str, str]: ...
    async def aclose(self) -> None: ...


@runtime_checkable
class TaskWorkflow(Protocol):
    """A task's workflow: status and assignee changes, and submitting it to the next stage."""

    async def update_task(self, task_id: int, changes: dict[str, Any]) -> dict[str, Any]: ...
    async def submit_task(self, task_id: int) -> dict[str, Any]: ...


def job_records(client: Platform) -> JobRecords:
    """The client as a `JobRecords`, or a refusal that says what to leave out."""
    if isinstance(client, JobRecords):
        return client
    raise PlatformError(
        f"{client.name} keeps no job records: leave out job_id / create_job (--job-id) on this platform"
    )


def agents(client: Platform) -> Agents:
    """The client as `Agents`, or a refusal that says what to leave out."""
    if isinstance(client, Agents):
        return client
    raise PlatformError(
        f"{client.name} has no agents: leave out `agent`; the pre-processor runs on this run's Ray cluster"
    )


def task_workflow(client: AsyncPlatform) -> TaskWorkflow:
    """The async client as a `TaskWorkflow` (prepare refused `on_success` where it is not one)."""
    if isinstance(client, TaskWorkflow):
        return client
    raise PlatformError("this platform has no task workflow: leave out on_success")
