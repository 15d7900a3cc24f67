"""The main job on real data, end to end through the command lines: train → evaluate → predict.

A tiny model (``configs/tiny.py`` at 64 px, evaluated at 96 px) trains for a few steps on a small
``digits`` dataset (generated into a temporary folder), then ``asff_jax.evaluate``
and ``asff_jax.predict`` run on its checkpoint. The numbers are meaningless
(the model is barely trained); the files, formats, and bad-input handling are
what is checked.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import experiment_script

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _env(tmp: Path) -> dict:
  # XLA flags and the session's compilation cache come from conftest (inherited via os.environ).
  del tmp
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(args, env, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)


def _digits_flags(tmp: Path, name: str, seed: int) -> list[str]:
  return [f"--config.dataset.root={tmp / name}", f"--config.dataset.data_dir={tmp / 'tfds'}",
          f"--config.dataset.digits_seed={seed}", "--config.dataset.digits_num_train=48",
          "--config.dataset.digits_num_val=12"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  env = _env(tmp)
  workdir = tmp / "run"
  r = _run(["asff_jax.train", f"--config={TINY}", f"--workdir={workdir}",
            "--config.dataset.source=digits", *_digits_flags(tmp, "digits", 0),
            "--config.model.num_classes=10", "--config.num_train_steps=2",
            "--config.checkpoint_every_steps=2", "--config.dataset.max_boxes=12",
            "--config.eval_at_end=True", "--config.eval.input_size=96"], env)
  assert r.returncode == 0, r.stderr[-5000:]
  return tmp, env, workdir, r


def test_train_on_digits_records_dataset_and_evaluates_at_end(trained):
  tmp, _, workdir, r = trained
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["dataset"]["class_names"] == [str(i) for i in range(10)]
  assert cfg["dataset"]["category_ids"] == list(range(1, 11))
  m = json.loads((workdir / "eval" / "val_metrics.json").read_text())
  assert set(METRICS) <= set(m) and m["num_images"] == 12 and m["tag"] == 2
  assert m["input_size"] == 96  # eval.input_size, not the 64 px training input (configs/default.py relies on it)
  assert all(0.0 <= m[k] <= 1.0 or m[k] == -1.0 for k in METRICS)
  assert "eval at step 2" in r.stderr


def test_evaluate_cli_and_other_dataset(trained):
  tmp, env, workdir, _ = trained
  r = _run(["asff_jax.evaluate", f"--workdir={workdir}"], env)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "AP50" in r.stdout
  m = json.loads((workdir / "eval" / "val_metrics.json").read_text())
  assert m["num_images"] == 12 and m["tag"] == 2 and set(METRICS) <= set(m) and m["input_size"] == 96
  results = json.loads((workdir / "eval" / "val_results.json").read_text())
  gt = json.loads((tmp / "digits" / "annotations" / "instances_val.json").read_text())
  assert {d["image_id"] for d in results} <= {im["id"] for im in gt["images"]}
  assert all(len(d["bbox"]) == 4 and 1 <= d["category_id"] <= 10 for d in results)
  # the same checkpoint on another COCO-format folder (a differently seeded digits set); in-process
  # through the same entry point (the subprocess path ran just above)
  from asff_jax import evaluate  # pylint: disable=import-outside-toplevel  (this test only)

  other = _digits_flags(tmp, "digits_other", 7) + ["--config.dataset.digits_num_val=9"]
  assert evaluate.main([f"--workdir={workdir}", f"--out_dir={tmp / 'other_eval'}", *other]) == 0
  m2 = json.loads((tmp / "other_eval" / "val_metrics.json").read_text())
  assert m2["num_images"] == 9


def test_evaluate_cli_errors_name_the_problem(trained, tmp_path, capsys):
  """A user's mistake: exit status 2 and one line on stderr, no traceback.

  In-process through ``evaluate.main`` (the same ``cli.run`` handler that ``python -m
  asff_jax.evaluate`` exits with; the subprocess path is run by the tests above), which saves
  a Python + TensorFlow start per case.
  """
  from asff_jax import evaluate  # pylint: disable=import-outside-toplevel  (this test only)

  _, _, workdir, _ = trained
  cases = [([f"--workdir={tmp_path / 'nothing'}"], ("config.json",)),
           ([f"--workdir={workdir}", "--checkpoint=999"], ("999", "available")),
           ([f"--workdir={workdir}", "--config.model.num_classes=3"], ("num_classes",))]
  for argv, words in cases:
    capsys.readouterr()
    assert evaluate.main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("asff_jax.evaluate: error: ")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), err[-2000:]
    assert "Traceback" not in err


def test_predict_cli_writes_images_json_and_fusion_maps(trained, tmp_path):
  tmp, env, workdir, _ = trained
  val = sorted((tmp / "digits" / "val").iterdir())[:2]
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
  out = tmp_path / "pred"
  r = _run(["asff_jax.predict", f"--workdir={workdir}", "--images", *map(str, val), str(bad),
            f"--out={out}", "--score_thre=0.0", "--fusion-maps"], env)
  assert r.returncode == 1, r.stderr[-4000:]  # the broken file is reported, the others done
  assert "broken.jpg" in r.stdout + r.stderr
  det = json.loads((out / "detections.json").read_text())
  assert set(det["detections"]) == {str(p) for p in val}
  assert str(bad) in det["failed"]
  for p in val:
    drawn = Image.open(out / f"{p.stem}.png")
    assert drawn.size == Image.open(p).size
    assert (out / f"{p.stem}_fusion.png").exists()
    w, h = Image.open(p).size
    for d in det["detections"][str(p)]:
      x1, y1, x2, y2 = d["bbox"]
      assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and d["class_name"] == str(d["class"])
      assert 0.0 <= d["score"] <= 1.0 and d["category_id"] == d["class"] + 1
    assert len(det["detections"][str(p)]) > 0  # score_thre 0 keeps the NMS survivors
  # boxes are in original pixels: a non-square input image maps back per axis
  assert np.isfinite([b for dets in det["detections"].values() for d in dets for b in d["bbox"]]).all()


def test_fusion_maps_experiment_script(trained, tmp_path, capsys):
  """``experiments/fusion_maps.py`` (the paper's Figure 3) as shipped, on the tiny run's checkpoint."""
  tmp, _, workdir, _ = trained
  val = sorted((tmp / "digits" / "val").iterdir())[:2]
  out = tmp_path / "maps"
  fm = experiment_script("fusion_maps")  # its main() in this process
  assert fm.main([f"--workdir={workdir}", "--images", *map(str, val), f"--out={out}", "--score_thre=0.0"]) == 0
  assert "step 2" in capsys.readouterr().out
  for p in val:
    assert (out / f"{p.stem}_fusion.png").stat().st_size > 0 and (out / f"{p.stem}.png").stat().st_size > 0


def test_gradient_probe_experiment_script(trained, tmp_path):
  """``experiments/gradient_probe.py`` (paper §3.3) as shipped, probing the tiny run's step 0 and checkpoint."""
  _, _, workdir, _ = trained
  out = tmp_path / "probe"
  # the script's own main() in this process (a second interpreter would only add its start-up)
  gp = experiment_script("gradient_probe")
  assert gp.main(["--runs", str(workdir), "--num_images=8", f"--out={out}"]) == 0
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(int(r["step"]), int(r["level"])) for r in rows] == [(s, n) for s in (0, 2) for n in range(3)]
  for r in rows:
    assert r["variant"] == "asff"
    if int(r["num_positive"]) == 0:
      continue
    assert abs(sum(float(r[f"share_l{l}"]) for l in range(3)) - 1.0) < 1e-6
    for k in ("cos_own_vs_others", "conflict_frac", "w_self"):
      if int(r["images_with_positives"]) > 1:  # an interval over images needs two of them
        assert float(r[k + "_lo"]) <= float(r[k]) + 1e-9 and float(r[k]) <= float(r[k + "_hi"]) + 1e-9
    assert 0.0 <= float(r["w_self"]) <= 1.0
    assert float(r["w_self"]) == pytest.approx(float(r[f"w_pos_{r['level']}"]))
    assert sum(float(r[f"w_bg_{k}"]) for k in range(3)) == pytest.approx(1.0, abs=1e-5)
  assert any(int(r["num_positive"]) > 0 for r in rows)
  assert (out / "results.md").read_text().startswith("# Gradient-consistency probe")
  assert (out / "curves.png").stat().st_size > 0 and all(int(r["probe_images"]) == 8 for r in rows)
  # --merge re-draws the rows of an earlier file unchanged, and a step without a checkpoint is a
  # one-line SystemExit message
  assert gp.main(["--merge", str(out / "results.csv"), "--num_images=8", f"--out={tmp_path / 'merged'}"]) == 0
  with open(tmp_path / "merged" / "results.csv") as f:
    assert list(csv.DictReader(f)) == rows
  with pytest.raises(SystemExit, match=r"no checkpoint at step\(s\) \[7\]"):
    gp.main(["--runs", str(workdir), "--steps=0,7", "--num_images=8", f"--out={out}"])
