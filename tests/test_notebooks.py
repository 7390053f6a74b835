"""The analysis notebooks run from a clean kernel and are committed without outputs.

``notebooks/balancing_dilemma.ipynb`` trains 8 small gates and estimates a shortened quickstart
(about 2 minutes on a busy two-core machine); it is written by
``notebooks/build_balancing_dilemma.py``, and the committed file must match it.
``quickstart.ipynb`` is executed by ``tests/test_end_to_end.py`` (it needs a run directory).
``sweep.ipynb`` runs a three-point sweep of a shortened quickstart (about 15 s on two cores).
Executed notebooks must show their figures: importing moesim must not switch matplotlib's
backend away from Jupyter's inline one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "build_balancing_dilemma", NOTEBOOKS / "build_balancing_dilemma.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_balancing_dilemma_committed_without_outputs() -> None:
    for cell in _read("balancing_dilemma.ipynb").cells:
        if cell.cell_type == "code":
            assert cell.get("outputs", []) == []
            assert cell.get("execution_count") is None


def test_balancing_dilemma_matches_its_builder() -> None:
    """The committed notebook is what ``build_balancing_dilemma.py`` writes (edit the builder)."""
    built = _builder().build()
    committed = _read("balancing_dilemma.ipynb")
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in built.cells
    ]


def test_balancing_dilemma_notebook_executes() -> None:
    outputs = _execute(_read("balancing_dilemma.ipynb"))
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 5  # collapse, α frontier, interference, domains, cost


def _execute(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, [f"{o['ename']}: {o['evalue']}" for o in errors]
    return outputs


def test_importing_results_keeps_the_backend():
    code = "import moesim.results, matplotlib; print(matplotlib.get_backend())"
    env = {**os.environ, "MPLBACKEND": "svg"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "svg"


def test_sweep_notebook_committed_without_outputs():
    for cell in _read("sweep.ipynb").cells:
        if cell.cell_type == "code":
            assert cell.get("outputs", []) == []
            assert cell.get("execution_count") is None


def test_sweep_notebook_executes_and_shows_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_SWEEP_DIR", str(tmp_path / "sweep"))
    outputs = _execute(_read("sweep.ipynb"))
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # GPU-hours and cost against γ; the compare bars
    assert (tmp_path / "sweep" / "sweep.parquet").is_file()
