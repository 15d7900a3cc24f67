"""Backbone pre-training by crop classification (``asff_jax.pretrain``) and its use in training."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from asff_jax import pretrain
from tests.conftest import tiny_config




def _tiny_config():
  return tiny_config()


def _records(n, seed=0):
  """Images with a few boxes: class 0 = red disc, class 1 = blue bar, class 2 = green ring; one crowd box."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    img = rng.integers(90, 160, (96, 128, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:96, :128]
    boxes, classes = [], []
    for _ in range(3):
      c = int(rng.integers(0, 3))
      r = int(rng.integers(8, 16))
      cx, cy = int(rng.integers(r, 128 - r)), int(rng.integers(r, 96 - r))
      d = np.hypot(xx - cx, yy - cy)
      if c == 0:
        img[d < r] = (220, 30, 30)
      elif c == 1:
        img[(np.abs(xx - cx) < r) & (np.abs(yy - cy) < r // 3)] = (30, 30, 220)
      else:
        img[(d < r) & (d > r / 2)] = (30, 200, 30)
      boxes.append([cx - r, cy - r, cx + r, cy + r])
      classes.append(c)
    boxes.append([0, 0, 50, 50])
    classes.append(0)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out.append({"image": buf.getvalue(), "image_id": i, "height": 96, "width": 128,
                "boxes": np.asarray(boxes, np.float32), "classes": np.asarray(classes, np.int32),
                "is_crowd": np.array([False, False, False, True])})
  return out


def test_extract_crops_shapes_skip_crowd_and_empty():
  recs = _records(4)
  crops, classes = pretrain.extract_crops(recs, crop_size=32, num_images=4, context_min=1.2,
                                          context_max=2.0, seed=0, log=lambda s: None)
  assert crops.shape == (12, 32, 32, 3) and crops.dtype == np.uint8  # 3 per image, crowd skipped
  np.testing.assert_array_equal(classes, np.concatenate([r["classes"][:3] for r in recs]))
  empty = [dict(recs[0], boxes=np.zeros((0, 4), np.float32), classes=np.zeros((0,), np.int32),
                is_crowd=np.zeros((0,), bool))]
  with pytest.raises(ValueError, match="no boxes"):
    pretrain.extract_crops(empty, crop_size=32, num_images=1, context_min=1.2, context_max=2.0, seed=0)


def test_pretraining_learns_the_classes_and_round_trips(tmp_path):
  config = _tiny_config()
  config.pretrain.update(dict(steps=60, batch_size=32, crop_size=32, crops_images=60, val_crops=40,
                              lr=3e-3))
  res = pretrain.pretrain_backbone(config, source=_records(60), log=lambda s: None)
  assert res["report"]["held_out_acc"] >= 0.9, res["report"]  # chance is 1/3
  path = str(tmp_path / "bb.msgpack")
  pretrain.save_backbone(path, res)
  tree = pretrain.load_backbone(path)
  jax.tree.map(np.testing.assert_array_equal, tree["params"], res["params"])
  (tmp_path / "bad.msgpack").write_bytes(b"not msgpack at all")
  with pytest.raises(ValueError, match="bad.msgpack"):
    pretrain.load_backbone(str(tmp_path / "bad.msgpack"))

  # merged into the detector: only the backbone changes; a different width is refused
  from asff_jax.models import create_model
  from tests.conftest import random_variables
  variables = random_variables(create_model(config))
  merged = pretrain.merge_backbone(variables, tree, path)
  jax.tree.map(np.testing.assert_array_equal, merged["params"]["backbone"], tree["params"])
  jax.tree.map(np.testing.assert_array_equal, merged["params"]["neck"], variables["params"]["neck"])
  wide = _tiny_config()
  wide.model.width = 0.25
  with pytest.raises(ValueError, match="bb.msgpack"):
    pretrain.merge_backbone(random_variables(create_model(wide)), tree, path)


def test_training_starts_from_the_backbone_file(tmp_path, monkeypatch):
  from asff_jax import checkpoints, train

  config = _tiny_config()
  config.num_train_steps = 2
  config.optimizer.lr = 0.0  # params stay at their initial values
  config.pretrain.update(dict(steps=5, batch_size=8, crop_size=32, crops_images=8, val_crops=0))
  calls = []
  real = pretrain.pretrain_backbone

  def counted(cfg, **kw):
    calls.append(1)
    return real(cfg, source=_records(8), **kw)

  monkeypatch.setattr(pretrain, "pretrain_backbone", counted)
  workdir = tmp_path / "run"
  workdir.mkdir()
  bb = train.initial_backbone(config, str(workdir))
  assert calls == [1] and (workdir / train.PRETRAIN_FILE).exists()
  assert json.loads((workdir / "pretrain.json").read_text())["steps"] == 5
  again = train.initial_backbone(config, str(workdir))  # a restart reuses the file
  assert calls == [1]
  jax.tree.map(np.testing.assert_array_equal, again["params"], bb["params"])

  config.model.backbone_init = str(workdir / train.PRETRAIN_FILE)
  train.train_and_evaluate(config, str(tmp_path / "run2"))
  assert calls == [1]  # backbone_init wins over pretrain.steps
  variables, _ = checkpoints.load_variables(str(tmp_path / "run2"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0),
               variables["params"]["backbone"], bb["params"])


def test_center_pool_takes_the_middle_cells():
  f = np.arange(2 * 5 * 4 * 1, dtype=np.float32).reshape(2, 5, 4, 1)
  out = np.asarray(pretrain.center_pool(f))
  # odd height 5 -> row 2; even width 4 -> columns 1, 2
  np.testing.assert_allclose(out, f[:, 2:3, 1:3].mean(axis=(1, 2)))
  one = np.ones((1, 1, 1, 3), np.float32) * 7
  np.testing.assert_allclose(np.asarray(pretrain.center_pool(one)), [[7, 7, 7]])


def test_center_pooled_pretraining_learns_and_rejects_unknown_pool():
  config = _tiny_config()
  config.pretrain.update(dict(steps=60, batch_size=32, crop_size=32, crops_images=60, val_crops=40,
                              lr=3e-3, pool="center"))
  res = pretrain.pretrain_backbone(config, source=_records(60), log=lambda s: None)
  assert res["report"]["held_out_acc"] >= 0.9, res["report"]  # chance is 1/3
  config.pretrain.pool = "max"
  with pytest.raises(ValueError, match="pretrain.pool"):
    pretrain.pretrain_backbone(config, source=_records(8), log=lambda s: None)
