"""What the run and the annotators need of a labeling platform, in the platform's own words.

The driver, the id source and the annotators speak to a platform only through these protocols, and
get one from `totask_ray.platform.connect`, the one place that picks the concrete client. Another
platform (Label Studio: `platform/label_studio`) is one more client that implements the same
methods. Nothing outside `platform/` builds a URL.

What differs by platform is declared on the client, never guessed: `needs_image_size` (an async
client that stores coordinates relative to the image; the annotator then passes `image_size` to
`annotate_task`), `supports_workflow` (a blocking client without a task workflow; a job with
`on_success` is refused before anything runs), and `media_headers(url)`, the credentials a file on
the platform's own origin needs (none for Synapse's signed URLs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from totask_ray.platform.models import Agent, DataCollection, DataUnit, Job, PluginRelease, Project, Task


@dataclass(frozen=True)
class TaskIdPage:
    """One page of a task listing: the total count, the ids on this page, and whether more follow."""

    count: int
    ids: list[int]
    next: str | None


@runtime_checkable
class Platform(Protocol):
    """Blocking calls: the driver's steps, the id source's reads, pre-processor releases, job records."""

    supports_workflow: bool  # task status, assignee and submit (`on_success`)

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
    def list_serve_applications(self, plugin_code: str, agent: int | None = None) -> list[dict[str, Any]]: ...
    def run_plugin(self, code: str, body: dict[str, Any]) -> Any: ...
    def get_agent(self, agent_id: int) -> Agent | None: ...
    def create_job(self, body: dict[str, Any]) -> Job: ...
    def get_job(self, job_id: int) -> Job: ...
    def update_job(self, job_id: int, changes: dict[str, Any]) -> dict[str, Any]: ...
    def post_logs(self, events: list[dict[str, Any]]) -> Any: ...
    def close(self) -> None: ...


@runtime_checkable
class AsyncPlatform(Protocol):
    """Per-task calls the annotators make, many at a time on one event loop."""

    needs_image_size: bool  # `annotate_task` needs the primary image's (width, height)

    async def get_task(self, task_id: int) -> Task: ...
    async def get_data_unit(self, data_unit_id: int) -> DataUnit: ...
    async def annotate_task(
        self,
        task_id: int,
        data: dict[str, Any],
        schema: str | None = None,
        *,
        image_size: tuple[int, int] | None = None,
    ) -> dict[str, Any]: ...
    async def media_headers(self, url: str) -> dict[str, str]: ...
    async def update_task(self, task_id: int, changes: dict[str, Any]) -> dict[str, Any]: ...
    async def submit_task(self, task_id: int) -> dict[str, Any]: ...
    async def aclose(self) -> None: ...
