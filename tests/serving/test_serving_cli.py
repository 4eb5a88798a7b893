"""`totask-ray serve`: deploy / status / delete against the session cluster, through typer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from totask_ray.serving.cli import serve_app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runner(ray_cluster):
    return CliRunner()


def write_config(tmp_path: Path, **rr) -> Path:
    config = yaml.safe_load((ROOT / "serve_apps" / "faces" / "config.yaml").read_text())
    config["code"] = "faces-cli"
    config["actions"]["inference"]["required_resources"] = rr
    config["actions"]["deployment"]["serve_options"].pop("num_replicas")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_deploy_status_delete(runner, tmp_path):
    config = write_config(tmp_path, required_cpu_count=0.25, required_gpu_count=0)
    try:
        result = runner.invoke(
            serve_app, ["deploy", str(config), "--timeout", "60", "--poll-interval", "0.1"]
        )
        assert result.exit_code == 0, result.output
        assert "capacity fits_now" in result.output
        assert "faces-cli@1.0.0: RUNNING (started" in result.output

        again = runner.invoke(serve_app, ["deploy", str(tmp_path), "--poll-interval", "0.1"])
        assert again.exit_code == 0 and "already running" in again.output

        listing = runner.invoke(serve_app, ["status"])
        assert listing.exit_code == 0 and "faces-cli@1.0.0\tRUNNING" in listing.output
        one = runner.invoke(serve_app, ["status", "faces-cli@1.0.0"])
        assert one.exit_code == 0 and "FaceDetector\tHEALTHY\tRUNNING=1" in one.output
    finally:
        gone = runner.invoke(serve_app, ["delete", "faces-cli@1.0.0"])
    assert gone.exit_code == 0, gone.output
    assert runner.invoke(serve_app, ["status", "faces-cli@1.0.0"]).exit_code == 1
    assert runner.invoke(serve_app, ["delete", "faces-cli@1.0.0"]).exit_code == 1


def test_deploy_never_fits_exits_non_zero_at_once(runner, tmp_path):
    config = write_config(tmp_path, required_cpu_count=1, required_gpu_count=4, num_replicas=2)
    result = runner.invoke(serve_app, ["deploy", str(config), "--timeout", "60"])
    assert result.exit_code == 1
    assert "never_fits" in result.output and "needs GPU 4 x 2 replicas" in result.output


def test_deploy_with_declared_node_types_reports_scaling(runner, tmp_path):
    config = write_config(tmp_path, required_cpu_count=1, required_gpu_count=4)
    result = runner.invoke(
        serve_app,
        ["deploy", str(config), "--cluster-yaml", str(ROOT / "cluster.yaml"), "--timeout", "0.5"],
    )
    # cluster.yaml's GPU nodes have 1 GPU each: 4 GPUs on one node is still impossible
    assert result.exit_code == 1 and "its node types add none" in result.output


def test_deploy_bad_config_exits_2(runner, tmp_path):
    config = write_config(tmp_path, num_gpu=1)
    result = runner.invoke(serve_app, ["deploy", str(config)])
    assert result.exit_code == 2
    assert "num_gpu: unknown key; did you mean 'num_gpus'" in result.output
