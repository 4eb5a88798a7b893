"""The driver notebook runs top to bottom in a real kernel, and shows what a user expects to see."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "driver.ipynb"


@pytest.mark.slow
def test_driver_notebook_executes(tmp_path, monkeypatch):
    for var in ("RAY_ADDRESS", "SYNAPSE_HOST", "SYNAPSE_ACCESS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    def text(i: int) -> str:
        out = []
        for o in nb.cells[i].get("outputs", []):
            out.append(o.get("text", ""))
            out.extend(str(v) for v in o.get("data", {}).values())
        return "\n".join(out)

    all_text = "\n".join(text(i) for i in range(len(nb.cells)))
    assert "SUCCEEDED - Annotated" in all_text  # both runs report their result
    assert "Traceback" not in all_text
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pngs, "the plot cell shows a picture"
    assert '"type": "bbox"' in all_text and '"label": "face"' in all_text  # a written face, read back
    assert os.environ.get("SYNAPSE_HOST") is None
