"""The quickstart notebook: shipped with its outputs, and it runs top to bottom from any working folder.

The shipped outputs come from one run on the shapes model (``assets/models/shapes-sd``)::

    HF_HUB_OFFLINE=1 python examples/execute_quickstart.py

The run test executes a copy with nbclient (a fresh kernel, bounded time) in a temporary working
folder, so the notebook's own path logic, not the working folder, finds the repository.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
CELL_TIMEOUT_S = 300
#: Image outputs: (content, style, stylized), cached style, (input, edited), composed, with tokens.
MIN_IMAGES = 5
#: The narrowest image the notebook may display, in pixels.
MIN_IMAGE_WIDTH = 256


def _outputs(notebook) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def _image_widths(outputs: list) -> list[int]:
    pngs = [output["data"]["image/png"] for output in outputs if "image/png" in output.get("data", {})]
    return [Image.open(io.BytesIO(base64.b64decode(png))).width for png in pngs]


def _printed(outputs: list) -> str:
    return "".join(output.get("text", "") for output in outputs if output.output_type == "stream")


def _check_outputs(notebook) -> None:
    outputs = _outputs(notebook)
    assert not [output for output in outputs if output.output_type == "error"]
    widths = _image_widths(outputs)
    assert len(widths) >= MIN_IMAGES and min(widths) >= MIN_IMAGE_WIDTH, widths  # shown at a visible size
    printed = _printed(outputs)
    assert "model:" in printed and "satisfied=" in printed


def test_notebook_ships_with_its_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code)  # executed, in order
    assert [cell.execution_count for cell in code] == sorted(cell.execution_count for cell in code)
    _check_outputs(notebook)
    printed = _printed(_outputs(notebook))
    assert str(ROOT) not in printed and "/tmp/" not in printed  # no paths of the machine that ran it


def test_notebook_runs_top_to_bottom_from_another_folder(monkeypatch, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # the kernel inherits it
    if os.environ.get("PYTHONPATH"):  # a relative PYTHONPATH would not hold in the other folder
        paths = [str(Path(p).resolve()) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    _check_outputs(notebook)
    if (ROOT / "assets" / "models" / "shapes-sd" / "model_index.json").is_file():
        assert "model: assets/models/shapes-sd" in _printed(_outputs(notebook))  # found from the other folder
