"""The experiment scripts run end to end on the tiny config (numbers meaningless, outputs checked)."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_tiny_digits_config

REPO = Path(__file__).resolve().parents[1]


def _script(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow  # ~2 min on 2 cores: kept out of CI (pytest -m slow)
def test_gradient_probe_script(tmp_path):
  gp = _script("gradient_probe")
  out = tmp_path / "out"
  assert gp.main(["--config", str(REPO / "configs" / "tiny.py"), "--variants", "sum,asff", "--steps", "2",
                  "--probe_every", "2", "--probe_batch", "4", "--workdir_root", str(tmp_path / "runs"),
                  "--out", str(out)]) == 0
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  # 2 variants x (init + step 2) x 3 levels
  assert len(rows) == 12
  assert {(r["variant"], r["step"]) for r in rows} == {(v, s) for v in ("sum", "asff") for s in ("0", "2")}
  for r in rows:
    if int(r["num_positive"]) > 0:
      shares = [float(r[f"share_l{l}"]) for l in range(3)]
      assert abs(sum(shares) - 1.0) < 1e-6
      assert -1.0 <= float(r["cos_own_vs_others"]) <= 1.0
      assert np.isnan(float(r["w_self"])) == (r["variant"] == "sum")
      if r["variant"] == "asff":
        assert 0.0 <= float(r["w_self"]) <= 1.0
  assert (out / "results.md").read_text().startswith("# Gradient-consistency probe")
  assert os.path.getsize(out / "conflict.png") > 0


@pytest.mark.slow  # trains 2 tiny models on a tiny digits set (~2 min): kept out of CI
def test_fusion_ablation_script(tmp_path):
  fa = _script("fusion_ablation")
  cfg = write_tiny_digits_config(tmp_path, num_train=32, num_val=8, num_train_steps=2)
  out = tmp_path / "out"
  args = ["--config", str(cfg), "--fusions", "none,asff", "--seeds", "0", "--time_repeats", "2",
          "--workdir_root", str(tmp_path / "runs"), "--out", str(out)]
  assert fa.main(args) == 0
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["fusion"], r["seed"]) for r in rows] == [("none", "0"), ("asff", "0")]
  assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("AP50", "AP50_agnostic"))
  md = (out / "results.md").read_text()
  assert "| none | 1 |" in md and "| asff | 1 |" in md
  # a finished run is not trained again
  mtime = os.path.getmtime(tmp_path / "runs" / "asff_s0" / "eval" / "val_metrics.json")
  assert fa.main(args) == 0
  assert os.path.getmtime(tmp_path / "runs" / "asff_s0" / "eval" / "val_metrics.json") == mtime


def test_coco_scale_script_tiny(tmp_path):
  """experiments/coco_scale.py at 40 images: COCO's category ids, a prepared split that opens again."""
  cs = _script("coco_scale")
  assert cs.main(["--out", str(tmp_path), "--num_images", "40"]) == 0
  import json  # pylint: disable=import-outside-toplevel  (test only)
  result = json.loads((tmp_path / "coco_scale.json").read_text())
  data = json.loads((tmp_path / "coco" / "annotations" / "instances_train2017.json").read_text())
  assert len(data["images"]) == result["images"] == result["records"] == 40
  assert [c["id"] for c in data["categories"]] == cs.COCO_CATEGORY_IDS and len(cs.COCO_CATEGORY_IDS) == 80
  assert result["boxes"] == len(data["annotations"]) > 40
  # crowd boxes are stored too: every box of the json is kept (all lie inside the shared image)
  assert result["boxes_kept"] == result["boxes"]
  assert result["prepare_s"] > 0 and result["open_s"] > 0 and result["prepare_peak_rss_mb"] > 0
  # the images are hard links to one file
  assert os.stat(tmp_path / "coco" / "shared_0.jpg").st_nlink == 41
