"""A real Label Studio 1.23.2 for the session: its own venv (built once, `devtools/ls_env.py`),
booted on 127.0.0.1 from a pre-migrated data dir (also built once) in a few seconds.

If label-studio cannot be installed here, every test in this folder is skipped with the reason;
if it is installed but the server does not start, they fail with the server's log tail.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ls_helpers import Media, media_host

from devtools.ls_env import LS_VERSION, LabelStudioServer, LsEnvError, ensure_ls_venv

REPO = Path(__file__).resolve().parents[2]


class Admin:
    """What a person does in Label Studio's UI, as API calls: the tests' side, never the client's."""

    def __init__(self, url: str, legacy_token: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Token {legacy_token}"}, timeout=60)

    def _ok(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            raise AssertionError(
                f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text[:300]}"
            )
        return r

    def create_project(self, title: str, label_config: str) -> dict[str, Any]:
        return self._ok(
            self.http.post("/api/projects/", json={"title": title, "label_config": label_config})
        ).json()

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task with its predictions and annotations (LS answers a dict, not a list)."""
        params = {"project": project_id, "page_size": 100_000, "fields": "all"}
        return self._ok(self.http.get("/api/tasks/", params=params)).json()["tasks"]

    def import_tasks(self, project_id: int, rows: list[dict[str, Any]]) -> list[int]:
        r = self._ok(
            self.http.post(
                f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=rows
            )
        )
        return list(r.json()["task_ids"])

    def upload_images(self, project_id: int, files: list[tuple[str, bytes]]) -> list[int]:
        """Upload images as a person drops them in: one task each, data `/data/upload/...`."""
        before = {t["id"] for t in self.list_tasks(project_id)}
        multipart = [(f"file{i}", (name, body, "image/jpeg")) for i, (name, body) in enumerate(files)]
        self._ok(self.http.post(f"/api/projects/{project_id}/import", files=multipart))
        return sorted({t["id"] for t in self.list_tasks(project_id)} - before)

    def predictions(self, project_id: int) -> list[dict[str, Any]]:
        return self._ok(self.http.get("/api/predictions/", params={"project": project_id})).json()

    def delete_task(self, task_id: int) -> None:
        self._ok(self.http.delete(f"/api/tasks/{task_id}/"))

    def delete_project(self, project_id: int) -> None:
        self._ok(self.http.delete(f"/api/projects/{project_id}/"))

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> int:
        """LS's own bulk import (`{"task", "result", "score", "model_version"}` each); how many it
        created. It drops a prediction that does not fit the labeling config without an error."""
        r = self.http.post(f"/api/projects/{project_id}/import/predictions", json=predictions)
        return int(self._ok(r).json()["created"])


@dataclass(frozen=True)
class LabelStudio:
    url: str
    legacy_token: str
    personal_token: str
    admin: Admin


@pytest.fixture(scope="session")
def label_studio_venv() -> Path:
    """The python of `.venv-ls` (what README's install line makes), built when missing."""
    try:
        return ensure_ls_venv(REPO)
    except LsEnvError as exc:
        pytest.skip(f"label-studio {LS_VERSION} could not be installed: {str(exc).splitlines()[0]}")


@pytest.fixture(scope="session")
def label_studio(label_studio_venv: Path) -> Iterator[LabelStudio]:
    with LabelStudioServer(REPO) as server:
        yield LabelStudio(
            server.url, server.legacy_token, server.personal_token, Admin(server.url, server.legacy_token)
        )


@pytest.fixture(scope="module")
def media() -> Iterator[tuple[str, type[Media]]]:
    """A second loopback host for images and annotation files; it records the auth it was sent."""
    with media_host() as host:
        yield host
