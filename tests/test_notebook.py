"""``experiments/asff_jax_colab.ipynb`` runs as shipped: every code cell, unmodified, in a fresh kernel.

The install cell detects that it is not on Colab and does nothing; ``ASFF_NB_SIZE=tiny`` makes
the run a seconds-long smoke run (1/8-width model, a tiny generated digits set, 2 steps). Any cell
that raises fails the test.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "asff_jax_colab.ipynb"


def test_notebook_is_what_its_generator_writes():
  spec = importlib.util.spec_from_file_location("make_nb", REPO / "experiments" / "make_colab_notebook.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert NOTEBOOK.read_text() == mod.render(), "run python experiments/make_colab_notebook.py"


def test_notebook_executes_unmodified(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setenv("ASFF_NB_SIZE", "tiny")
  monkeypatch.setenv("ASFF_NB_WORKDIR", str(workdir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO / "experiments")}})
  client.execute()  # raises CellExecutionError if a cell fails
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "batch 2 x 2 steps" in text and "AP50" in text and "detections" in text and "level 2:" in text
  assert (workdir / "figures" / "figure3.png").stat().st_size > 0
  assert (workdir / "checkpoints" / "2").is_dir() and os.path.exists(workdir / "eval" / "val_metrics.json")
