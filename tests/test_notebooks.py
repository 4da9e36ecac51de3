"""The notebooks: stored without outputs, and quickstart.ipynb runs top to bottom on CPU (nbclient)."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "qlora_gsm8k.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(not cell.outputs and cell.execution_count is None for cell in code_cells)


def test_qlora_notebook_is_marked_gpu_only():
    notebook = nbformat.read(NOTEBOOKS / "qlora_gsm8k.ipynb", as_version=4)
    assert "GPU only" in notebook.cells[0].source
    assert any("torch.cuda.is_available()" in cell.source for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # Fast mode (see the notebook's first code cell): small warm start in a temporary cache, a few PRIME steps.
    monkeypatch.setenv("PRIME_TRL_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "held-out sampled accuracy" in text and "first wrong step of the wrong answer" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 2  # the curves and the heat map
    assert any("text/html" in output.get("data", {}) for output in outputs)  # the HTML token heat map
