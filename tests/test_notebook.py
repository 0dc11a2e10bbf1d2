"""The example notebook runs, top to bottom, on a directory of small real runs, and is kept
in git without outputs."""

from __future__ import annotations

import nbformat
import pytest
from fixtures import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "results" / "notebooks" / "postprocessing.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.timeout(300)
def test_notebook_runs_on_demo_like_runs(result_runs, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    runs = next(iter(result_runs.values())).parent
    params = nb.cells[1]
    assert params.source.startswith("# the directory of run files")
    params.source = f"RUNS = {str(runs)!r}"
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    assert f"(run: {len(result_runs)})" in text  # the study in xarray, one entry per run
    assert "pwrite64" in text or "openat" in text  # the offloaded calls' latency table
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the FWQ CDFs and the call latencies
