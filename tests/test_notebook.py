"""``experiments/asff_jax_colab.ipynb``: its code cells run end to end on a tiny digits config.

Shell and magic lines (``!pip ...``, ``%cd``) are dropped; the parameters cell
reads ``ASFF_NB_*`` environment variables, set here to a 1/8-width model on a
tiny generated digits set, 2 training steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import write_tiny_digits_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "asff_jax_colab.ipynb"


def code_cells(path: Path) -> list[str]:
  nb = json.loads(path.read_text())
  assert nb["nbformat"] == 4
  cells = []
  for c in nb["cells"]:
    if c["cell_type"] != "code":
      continue
    lines = [l for l in "".join(c["source"]).splitlines() if not l.lstrip().startswith(("!", "%"))]
    cells.append("\n".join(lines))
  return cells


@pytest.mark.slow  # ~2 min on 2 cores (four compilations of the tiny model): run with pytest -m slow
def test_notebook_runs_on_tiny_config(tmp_path, monkeypatch):
  cfg = write_tiny_digits_config(tmp_path, num_train=24, num_val=6, eval_at_end=False)
  workdir = tmp_path / "run"
  monkeypatch.setenv("ASFF_NB_CONFIG", str(cfg))
  monkeypatch.setenv("ASFF_NB_WORKDIR", str(workdir))
  monkeypatch.setenv("ASFF_NB_STEPS", "2")
  monkeypatch.setenv("ASFF_NB_IMAGES", "2")
  monkeypatch.chdir(REPO)
  ns: dict = {}
  for i, src in enumerate(code_cells(NOTEBOOK)):
    exec(compile(src, f"{NOTEBOOK.name}[cell {i}]", "exec"), ns)  # pylint: disable=exec-used
  assert set(("AP", "AP50")) <= set(ns["metrics"]) and ns["metrics"]["step"] == 2
  assert len(ns["res"]["detections"]) == 2 and not ns["res"]["failed"]
  assert any(p.name.endswith("_fusion.png") for p in (workdir / "predictions").iterdir())
  summary = ns["summary"]
  assert set(summary) == {0, 1, 2}
  assert sum(s["num_positive"] for s in summary.values()) > 0
  assert os.path.exists(workdir / "eval" / "val_metrics.json")
