"""Session-wide fixtures: one local Ray cluster and one embedded platform for the whole suite.

A fresh Ray per test costs ~5 s (shared/reference/ray-2.60-notes.md), so tests share one and isolate
themselves by creating their own projects on the shared platform.
"""

from __future__ import annotations

import os
import tempfile

# Before anything imports ray: nothing may report usage, and a stray RAY_ADDRESS breaks ray.init.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
for _var in (
    "SYNAPSE_HOST",
    "SYNAPSE_ACCESS_TOKEN",
    "SYNAPSE_PLUGIN_RUN_USER_TOKEN",
    "SYNAPSE_PLUGIN_RUN_TENANT",
):
    os.environ.pop(_var, None)
# Runs without --report or --ledger keep their ledger here, not in the checkout (CLI runs inherit it).
os.environ["TOTASK_LEDGER_DIR"] = os.path.join(tempfile.mkdtemp(prefix="totask-test-ledgers-"), "ledgers")

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

# Logical resources: 4 CPUs on a 2-core box so Data actors and a Serve replica fit together, and one
# logical GPU so GPU-needing deployments can be scheduled and gated without hardware.
RAY_NUM_CPUS = 4
RAY_NUM_GPUS = 1


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(
        # a new local cluster even if another one runs on this machine (a `ray start`, a bench):
        # without it ray.init joins that one and refuses num_cpus/num_gpus
        address="local",
        num_cpus=RAY_NUM_CPUS,
        num_gpus=RAY_NUM_GPUS,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def platform(tmp_path_factory):
    """The embedded platform, as a separate server process over real HTTP on loopback."""
    from totask_ray.embedded.server import LocalPlatform

    with LocalPlatform(data_dir=tmp_path_factory.mktemp("platform"), fault_injection=True) as lp:
        yield lp


@pytest.fixture(scope="module")
def slow_platform(tmp_path_factory, request):
    """A platform of the module's own with 15 ms per answer (fault injection on), so that a run
    lasts long enough to be stopped or killed mid-way."""
    from totask_ray.embedded.server import LocalPlatform

    name = request.module.__name__.rsplit(".", 1)[-1]
    with LocalPlatform(
        data_dir=tmp_path_factory.mktemp(f"{name}-platform"), latency_ms=15, fault_injection=True
    ) as lp:
        yield lp


@pytest.fixture(scope="session")
def serve_http_port(ray_cluster) -> int:
    """Start Serve with its proxy on loopback and a free port; return the port actually in use.

    If another test module already started Serve in this session, its options stand (Serve ignores
    new ones), so the port is read back from the controller rather than assumed.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    config = _get_global_client().http_config
    assert config.host in ("127.0.0.1", "localhost"), f"Serve's proxy must bind loopback, got {config.host}"
    return int(config.port)


# -- Label Studio's venv, built while the rest of the suite runs ----------------------------------

_LS_BUILD = pytest.StashKey[subprocess.Popen]()


def _uses_the_server(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return "label_studio" in names or "label_studio_venv" in names


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses the Label Studio server, or its venv, is slow (it waits for the venv's
    build): marked here, before `-m "not slow"` deselects, so no such test needs telling."""
    for item in items:
        if _uses_the_server(item) or item.get_closest_marker("ls_venv"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """On a fresh machine Label Studio's venv and migrated data template take minutes (211 s of
    one CI run, all of it before the first Label Studio test could start). Start that build in a
    background process now and run the tests that use the server last, so the build overlaps the
    rest of the suite; tests marked `ls_venv` (the bench smoke) keep their place. The build takes
    the same cross-process locks as the fixture, so a test that gets there first waits for it (or
    builds itself, if the build failed) instead of racing it. Only the tests selected to run count:
    `make test-fast` builds nothing."""
    config, items = session.config, session.items
    if not any(_uses_the_server(i) or i.get_closest_marker("ls_venv") for i in items):
        return
    root = Path(__file__).resolve().parents[1]
    with open(Path(tempfile.gettempdir()) / "totask-ls-venv-build.log", "w") as log:
        config.stash[_LS_BUILD] = subprocess.Popen(
            [sys.executable, "-m", "devtools.ls_env", str(root)],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    items[:] = [i for i in items if not _uses_the_server(i)] + [i for i in items if _uses_the_server(i)]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An interrupted session leaves no build running (the next one builds the venv afresh)."""
    proc = session.config.stash.get(_LS_BUILD, None)
    if proc is not None and proc.poll() is None:
        proc.terminate()  # it unwinds: pip killed, a template's server stopped
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
