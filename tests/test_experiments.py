"""The experiment scripts run end to end on the tiny config (numbers meaningless, outputs checked)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import experiment_script, write_tiny_digits_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~2 min on 2 cores: kept out of CI (pytest -m slow); the --runs mode runs in CI (test_cli)
def test_gradient_probe_script_trains_then_probes(tmp_path):
  gp = experiment_script("gradient_probe")
  out = tmp_path / "out"
  assert gp.main(["--train", "--config", str(REPO / "configs" / "tiny.py"), "--variants", "sum,asff",
                  "--train_steps", "2", "--probe_every", "2", "--num_images", "8",
                  "--workdir_root", str(tmp_path / "runs"), "--out", str(out)]) == 0
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
      assert (r["w_self"] == "") == (r["variant"] == "sum")
      if r["variant"] == "asff":
        assert 0.0 <= float(r["w_self"]) <= 1.0
  assert (out / "results.md").read_text().startswith("# Gradient-consistency probe")
  assert os.path.getsize(out / "curves.png") > 0


@pytest.mark.slow  # trains 2 tiny models on a tiny digits set (~2 min): kept out of CI
def test_fusion_ablation_script(tmp_path):
  fa = experiment_script("fusion_ablation")
  cfg = write_tiny_digits_config(tmp_path, num_train=32, num_val=8, num_train_steps=2)
  out = tmp_path / "out"
  args = ["--config", str(cfg), "--fusions", "none,asff", "--seeds", "0", "--time_repeats", "2",
          "--workdir_root", str(tmp_path / "runs"), "--out", str(out)]
  assert fa.main(args) == 0
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["variant"], r["seed"]) for r in rows] == [("none", "0"), ("asff", "0")]
  assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("AP50", "AP50_agnostic"))
  md = (out / "results.md").read_text()
  assert "| none | 1 |" in md and "| asff | 1 |" in md
  assert "| asff − none | AP50 |" in md and "one seed: no interval" in md
  assert "| 1.000 (1.000–1.000) |" in md  # none against itself, round by round
  assert (out / "runs" / "asff_s0.csv").exists() and (out / "runs" / "none_s0.csv").exists()
  assert all(float(r["train_s"]) > 0 for r in rows)
  # a finished run is not trained again; found finished without its CSV, its training time is unknown
  mtime = os.path.getmtime(tmp_path / "runs" / "asff_s0" / "eval" / "val_metrics.json")
  os.remove(out / "runs" / "asff_s0.csv")
  assert fa.main(args) == 0
  assert os.path.getmtime(tmp_path / "runs" / "asff_s0" / "eval" / "val_metrics.json") == mtime
  with open(out / "runs" / "asff_s0.csv") as f:
    assert np.isnan(float(next(csv.DictReader(f))["train_s"]))


def test_coco_scale_script_tiny(tmp_path):
  """experiments/coco_scale.py at 40 images: COCO's category ids, a prepared split that opens again."""
  cs = experiment_script("coco_scale")
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


@pytest.mark.slow  # two compiles of the tiny model (~1 min): kept out of CI
def test_steps_per_dispatch_scan_equals_loop(tmp_path):
  """The scanned variant the probe times runs the same steps: params equal the dispatch loop's."""
  spd = experiment_script("steps_per_dispatch")
  cfg = write_tiny_digits_config(tmp_path, num_train=16, num_val=4, num_train_steps=20)
  r = spd.measure(str(cfg), k=2, rounds=1)
  assert r["one_s"] > 0 and r["scan_s"] > 0
  assert r["max_param_diff"] < 1e-4


def test_fusion_ablation_paired_intervals_and_run_csvs(tmp_path):
  """Table 3's analysis: paired per-seed differences, t-intervals, verdicts; per-run CSVs re-read."""
  fa = experiment_script("fusion_ablation")
  ap50 = {("asff", 0): 0.40, ("asff", 1): 0.42, ("asff", 2): 0.41,
          ("sum", 0): 0.30, ("sum", 1): 0.33, ("sum", 2): 0.31,
          ("none", 0): 0.41, ("none", 1): 0.40, ("none", 2): 0.43}
  rows = [{"variant": f, "seed": s, "steps": 100, **{k: v for k in fa.METRICS}, "train_s": 1.0}
          for (f, s), v in ap50.items()]
  d = fa.paired_difference(rows, "asff", "sum", "AP50")
  assert d["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(d["diffs"], [0.10, 0.09, 0.10], atol=1e-12)
  diffs = np.array(d["diffs"])
  half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2)
  assert d["mean"] == pytest.approx(diffs.mean()) and d["low"] == pytest.approx(diffs.mean() - half)
  assert fa.verdict(d, "asff", "sum") == "asff is better than sum"
  d2 = fa.paired_difference(rows, "asff", "none", "AP50")  # +0.01, -0.02... interval spans 0
  assert d2["low"] < 0 < d2["high"] and fa.verdict(d2, "asff", "none").startswith("not resolved")
  assert fa.verdict(fa.paired_difference(rows, "sum", "asff", "AP50"), "sum", "asff") == "sum is worse than asff"
  assert fa.paired_difference(rows, "asff", "concat", "AP50") is None
  # per-run CSVs: written atomically, read back only for the same number of steps
  fa.write_run(str(tmp_path), "asff_s0", rows[0])
  assert fa.read_run(str(tmp_path), "asff_s0", 100) == rows[0]
  assert fa.read_run(str(tmp_path), "asff_s0", 200) is None and fa.read_run(str(tmp_path), "sum_s0", 100) is None
  # a CSV of the script before --vary (value in a 'fusion' column) reads the same
  old = tmp_path / "runs" / "sum_s1.csv"
  old.write_text("fusion,seed,steps," + ",".join(fa.METRICS) + ",train_s\n"
                 "sum,1,100," + ",".join(["0.33"] * len(fa.METRICS)) + ",5.0\n")
  assert fa.read_run(str(tmp_path), "sum_s1", 100) == {**rows[4], "train_s": 5.0}
  fa.write_outputs(str(tmp_path), rows, {"none": (1.0, 1.0, 1.0), "sum": (1.01, 1.0, 1.02),
                                         "asff": (1.04, 1.03, 1.05)}, "cmd", 10.0)
  md = (tmp_path / "results.md").read_text()
  assert "| asff − sum | AP50 | 0: +0.100, 1: +0.090, 2: +0.100 | +0.097 |" in md
  assert "asff is better than sum" in md and "| asff | 3 | 0.410 ± 0.008 |" in md
  assert "Wall time of this command: 0.00 h." in md
  # training minutes per run: mean (min–max) of the known times; a run found finished (NaN) is left out
  timed = [{**r, "train_s": {0: 600.0, 1: 1200.0, 2: float("nan")}[r["seed"]]} for r in rows]
  fa.write_outputs(str(tmp_path), timed, {"asff": (1.04, 1.01, 1.08)}, "cmd", 30.0, report_only=True)
  md = (tmp_path / "results.md").read_text()
  assert "| 1.040 (1.010–1.080) | 15.0 (10.0–20.0) |" in md and "| sum | 3 |" in md
  assert "0.5 min (report only: it trained nothing" in md
  fa.write_run(str(tmp_path), "asff_s2", timed[2])  # an unknown training time survives the CSV round trip
  assert np.isnan(fa.read_run(str(tmp_path), "asff_s2", 100)["train_s"])
  # a run's checkpoint evaluated again at another size is not its final evaluation
  (tmp_path / "wd" / "eval").mkdir(parents=True)
  (tmp_path / "wd" / "eval" / "val_metrics.json").write_text('{"tag": 100, "input_size": 416, "AP50": 0.5}')
  assert fa.final_metrics(str(tmp_path / "wd"), 100, 256) is None
  assert fa.final_metrics(str(tmp_path / "wd"), 100, 416)["AP50"] == 0.5


def test_fusion_ablation_vary_any_key(tmp_path):
  """``--vary KEY=...`` (Table 2): values parsed as literals, run names, config set, pairs against the first."""
  fa = experiment_script("fusion_ablation")
  assert [fa.parse_value(v) for v in ("None", "0.2", "0", "asff", "none")] == [None, 0.2, 0, "asff", "none"]
  assert fa.run_name("model.fusion", "asff", 2) == "asff_s2"
  assert fa.run_name("loss.adjacent_ignore_eps", 0.2, 1) == "adjacent_ignore_eps=0.2_s1"
  c = fa.run_config(str(REPO / "configs" / "tiny.py"), "loss.adjacent_ignore_eps", 0.5, 3, steps=7)
  assert c.loss.adjacent_ignore_eps == 0.5 and c.seed == 3 and c.num_train_steps == 7
  assert c.eval_every_steps == 0 and c.eval_at_end
  assert fa.run_config(str(REPO / "configs" / "tiny.py"), "loss.adjacent_ignore_eps", None, 0).loss.adjacent_ignore_eps is None
  with pytest.raises(TypeError):
    fa.run_config(str(REPO / "configs" / "tiny.py"), "loss.adjacent_ignore_eps", "wide", 0)
  assert fa.default_pairs("loss.adjacent_ignore_eps", ["None", "0.2", "0.5"]) == [("0.2", "None"), ("0.5", "None")]
  assert fa.default_pairs("model.fusion", ["none", "sum", "asff"]) == [("asff", "sum"), ("asff", "none")]
  assert fa.parse_pairs("0.2-None, 0.5-None") == [("0.2", "None"), ("0.5", "None")]
  rows = [{"variant": v, "seed": s, "steps": 10, **{k: ap for k in fa.METRICS}, "train_s": 1.0}
          for (v, s), ap in {("None", 0): 0.30, ("None", 1): 0.32, ("0.2", 0): 0.31, ("0.2", 1): 0.36}.items()]
  fa.write_outputs(str(tmp_path), rows, {}, "cmd", 1.0, key="loss.adjacent_ignore_eps", missing=["0.5_s0"])
  md = (tmp_path / "results.md").read_text()
  assert md.startswith("# `loss.adjacent_ignore_eps` on the built-in dataset")
  assert "Not run yet (absent from this table): 0.5_s0." in md
  assert "| 0.2 − None | AP50 | 0: +0.010, 1: +0.040 | +0.025 |" in md and "| None | 2 |" in md
  # --report_only trains nothing and reports what is missing
  out = tmp_path / "report"
  fa.write_run(str(out), "asff_s0", {**rows[0], "variant": "asff"})
  with pytest.raises(SystemExit, match="no finished run"):
    fa.main(["--config", str(REPO / "configs" / "tiny.py"), "--fusions", "sum", "--seeds", "0",
             "--workdir_root", str(tmp_path / "none_here"), "--out", str(out), "--report_only"])


@pytest.mark.parametrize("what", ["kernel", "input"])
def test_conv_grad_micro_script(what, capsys):
  """``experiments/conv_grad_micro.py`` at a tiny size: both formulations agree (it exits 1 otherwise)."""
  assert experiment_script("conv_grad_micro").main(["--what", what, "--batch", "1", "--shrink", "16"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "max rel diff" in l]
  assert len(lines) == (9 if what == "kernel" else 6)
