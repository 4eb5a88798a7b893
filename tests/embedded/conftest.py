"""Fixtures for the embedded platform's tests: real HTTP against real server processes.

The session `platform` (root conftest, fault injection on) is shared; each module makes its own
projects through `platform.store` so tests do not see each other's data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from totask_ray.embedded.seeds import seed_files_demo
from totask_ray.embedded.server import LocalPlatform


@pytest.fixture(scope="module")
def client(platform: LocalPlatform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.url, headers=platform.headers, timeout=15) as c:
        yield c


@pytest.fixture(scope="module")
def anon(platform: LocalPlatform) -> Iterator[httpx.Client]:
    """A client that sends no credentials."""
    with httpx.Client(base_url=platform.url, timeout=15) as c:
        yield c


@pytest.fixture(scope="module")
def demo(platform: LocalPlatform) -> dict[str, Any]:
    """A files demo project of 250 tasks, shared by a module's tests (read-only use)."""
    return seed_files_demo(platform.store, platform.media_dir, tasks=250, seed=7)


@pytest.fixture(scope="module")
def remote_like(tmp_path_factory) -> Iterator[LocalPlatform]:
    """A second platform with a tenant, 150 ms latency and no fault injection."""
    with LocalPlatform(tmp_path_factory.mktemp("remote-like"), tenant="acme", latency_ms=150) as lp:
        yield lp
