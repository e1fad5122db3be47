"""Execute ``examples/quickstart.ipynb`` in place, so that it ships with its outputs.

    HF_HUB_OFFLINE=1 python examples/execute_quickstart.py

A fresh kernel runs every cell on the shapes model (about a minute on a CPU); the outputs are kept
as they came, without execution timestamps and without the JPEG copy IPython adds beside each PNG.
"""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parent / "quickstart.ipynb"


def main() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(NOTEBOOK.parent)}}
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources)
    client.execute()
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timestamps
        for output in cell.get("outputs", []):
            output.get("data", {}).pop("image/jpeg", None)
    nbformat.validate(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"executed {NOTEBOOK}")


if __name__ == "__main__":
    main()
