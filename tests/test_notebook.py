"""The total-recall notebook runs headless and its recall and locality checks (asserts in its cells) hold."""

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "total_recall.ipynb"


def test_total_recall_notebook_executes(tmp_path, smollm2):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_token = os.environ.pop("HF_TOKEN", None)  # never push from CI
    try:
        # Run in a copy of the repo root layout so the figure lands in tmp, not in the checkout.
        (tmp_path / "docs").mkdir()
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if env_token is not None:
            os.environ["HF_TOKEN"] = env_token
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Omega-99" in outputs and "same as bare: True" in outputs and "same as bare: False" not in outputs
    assert (tmp_path / "docs" / "total_recall_surprise.png").stat().st_size > 10_000
