"""Export (``asff_jax.export``): reloaded artefacts give the detections of ``asff_jax.predict``.

A tiny ASFF model with random, well-conditioned weights is written as a
workdir (``checkpoints.write_workdir``, what ``convert`` writes); ``asff_jax.predict`` runs on a few PNGs
of different sizes; the StableHLO artefact (exported through the command line)
and the SavedModel are each reloaded in a fresh process — the latter with
TensorFlow only, JAX never imported — and must return the same detections:
boxes within 1e-3 px, same classes, same order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import random_variables, tiny_config

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (90, 120), (150, 70)]
SCORE_THRE = 0.02

_JAX_RUNNER = r"""
import json, sys
import numpy as np
from PIL import Image
import jax
exp = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = [np.asarray(Image.open(p).convert("RGB")) for p in sys.argv[2:]]
res = {p: {k: np.asarray(v[0]).tolist() for k, v in exp.call(x[None]).items()}
       for p, x in zip(sys.argv[2:], images)}
# symbolic batch: the same image twice in one call
two = exp.call(np.stack([images[0], images[0]]))
res["batch2"] = {k: np.asarray(v).tolist() for k, v in two.items()}
print(json.dumps(res))
"""

_TF_RUNNER = r"""
import json, sys
sys.modules["jax"] = None  # JAX unavailable (TF imports it opportunistically for TFLite when present)
import numpy as np
from PIL import Image
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
f = m.signatures["serving_default"]
res = {}
for p in sys.argv[2:]:
  x = tf.constant(np.asarray(Image.open(p).convert("RGB"))[None])
  res[p] = {k: v.numpy()[0].tolist() for k, v in f(images=x).items()}
res["jax_imported"] = any(sys.modules[k] is not None for k in sys.modules
                          if k == "jax" or k.startswith(("jax.", "jaxlib")))
print(json.dumps(res))
"""


def _env() -> dict:
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))


def _run_fresh(code: str, *args) -> dict:
  r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=_env(), capture_output=True,
                     text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-4000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from asff_jax.training import checkpoints
  from asff_jax.models import create_model
  tmp = tmp_path_factory.mktemp("export")
  config = tiny_config()
  config.dataset.class_names = ["a", "b", "c"]
  config.dataset.category_ids = [3, 7, 11]
  variables = random_variables(create_model(config), seed=1)
  workdir = tmp / "run"
  checkpoints.write_workdir(str(workdir), variables, config)
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate(SIZES):
    # smooth random images (blobs), less degenerate than white noise
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    paths.append(tmp / f"img{i}.png")
    img.save(paths[-1])
  from asff_jax.tools.predict import predict_files
  ref = predict_files(str(workdir), [str(p) for p in paths], str(tmp / "pred"), score_thre=SCORE_THRE)
  assert not ref["failed"]
  return tmp, workdir, paths, ref["detections"]


def _assert_same(ref_dets, out, cat_ids=(3, 7, 11)):
  k = int(out["num_valid"])
  boxes = np.asarray(out["boxes"], np.float64)
  assert k == len(ref_dets) and k > 0
  np.testing.assert_allclose(boxes[:k], np.array([d["bbox"] for d in ref_dets]), atol=1e-3, rtol=0)
  assert list(out["classes"][:k]) == [d["class"] for d in ref_dets]
  np.testing.assert_allclose(out["scores"][:k], [d["score"] for d in ref_dets], atol=1e-5)
  assert list(out["category_ids"][:k]) == [cat_ids[c] for c in out["classes"][:k]]
  # padding rows are zeros
  assert not np.any(boxes[k:]) and not np.any(np.asarray(out["scores"])[k:])


def test_stablehlo_cli_reloaded_matches_predict(setup):
  tmp, workdir, paths, ref = setup
  out = tmp / "hlo"
  r = subprocess.run([sys.executable, "-m", "asff_jax.export", f"--workdir={workdir}", "--input-size", "64",
                      "--out", str(out), f"--score_thre={SCORE_THRE}"], env=_env(), capture_output=True,
                     text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-4000:]
  meta = json.loads((out / "asff_export.json").read_text())
  assert meta["input_size"] == 64 and meta["platforms"] == ["cpu", "cuda", "tpu"]
  assert meta["class_names"] == ["a", "b", "c"] and meta["image_input"]["shape"] == "b, h, w, 3"
  res = _run_fresh(_JAX_RUNNER, out / "model.jax_export", *paths)
  for p in paths:
    _assert_same(ref[str(p)], res[str(p)])
  two = res["batch2"]
  for i in range(2):
    _assert_same(ref[str(paths[0])], {k: v[i] for k, v in two.items()})


def test_saved_model_runs_without_jax_and_matches_predict(setup):
  from asff_jax.tools import export

  tmp, workdir, paths, ref = setup
  out = tmp / "sm"
  meta = export.export_workdir(str(workdir), str(out), input_size=64, fmt="saved_model",
                               score_thre=SCORE_THRE)
  assert meta["platforms"] == ["cpu"] and (out / "saved_model.pb").exists()
  res = _run_fresh(_TF_RUNNER, out, *paths)
  assert res["jax_imported"] is False
  for p in paths:
    _assert_same(ref[str(p)], res[str(p)])


def test_fixed_shapes_and_bad_flags(setup, tmp_path):
  import jax
  from asff_jax.tools import export

  _, workdir, paths, ref = setup
  meta = export.export_workdir(str(workdir), str(tmp_path / "fixed"), input_size=64, batch_size=1,
                               image_hw=SIZES[1], score_thre=SCORE_THRE, platforms="cpu")
  assert meta["image_input"]["shape"] == "1, 90, 120, 3"
  exp = jax.export.deserialize((tmp_path / "fixed" / "model.jax_export").read_bytes())
  assert exp.in_avals[0].shape == (1, 90, 120, 3)
  x = np.asarray(Image.open(paths[1]).convert("RGB"))[None]
  _assert_same(ref[str(paths[1])], {k: np.asarray(v[0]) for k, v in exp.call(x).items()})
  with pytest.raises(ValueError, match="--format"):
    export.export_workdir(str(workdir), str(tmp_path / "x"), fmt="onnx")
  with pytest.raises(ValueError, match="--platforms"):
    export.export_workdir(str(workdir), str(tmp_path / "x"), platforms="cpu,gpu9")
  with pytest.raises(ValueError, match="multiple of 32"):
    export.export_workdir(str(workdir), str(tmp_path / "x"), input_size=100)
  with pytest.raises(FileNotFoundError):
    export.export_workdir(str(tmp_path / "missing"), str(tmp_path / "x"))


def test_resize_matches_tf_bilinear():
  import tensorflow as tf
  from asff_jax.tools import export

  rng = np.random.default_rng(3)
  for h, w, s in [(37, 100, 64), (64, 64, 64), (200, 33, 32)]:
    x = rng.integers(0, 255, (2, h, w, 3), dtype=np.uint8)
    ours = np.asarray(export.resize_bilinear(x, s))
    ref = tf.image.resize(x, (s, s), "bilinear").numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_mobilenet_v2_exports_and_reloads(tmp_path):
  """The MobileNetV2 + ASFF model (no deformable conv) exports to StableHLO and reloads to predict's detections."""
  from asff_jax.training import checkpoints  # pylint: disable=import-outside-toplevel  (as in setup)
  from asff_jax.models import create_model  # pylint: disable=import-outside-toplevel  (as in setup)
  from asff_jax.tools import export  # pylint: disable=import-outside-toplevel  (as in setup)
  from asff_jax.tools.predict import predict_files  # pylint: disable=import-outside-toplevel  (as in setup)

  config = tiny_config()
  config.model.backbone, config.model.anchors = "mobilenet_v2", "yolov3"
  config.dataset.class_names, config.dataset.category_ids = ["a", "b", "c"], [3, 7, 11]
  workdir = tmp_path / "run"
  checkpoints.write_workdir(str(workdir), random_variables(create_model(config), seed=2), config)
  rng = np.random.default_rng(1)
  path = tmp_path / "img.png"
  Image.fromarray(rng.integers(0, 255, (11, 16, 3), dtype=np.uint8)).resize((120, 90), Image.BILINEAR).save(path)
  ref = predict_files(str(workdir), [str(path)], str(tmp_path / "pred"), score_thre=SCORE_THRE)["detections"]
  meta = export.export_workdir(str(workdir), str(tmp_path / "hlo"), input_size=64, score_thre=SCORE_THRE)
  assert meta["input_size"] == 64
  res = _run_fresh(_JAX_RUNNER, tmp_path / "hlo" / "model.jax_export", path)
  _assert_same(ref[str(path)], res[str(path)])
