"""Every shipped config file loads, builds its model and traces at its input size (no compilation)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax.traverse_util import flatten_dict

from asff_jax.models import create_model
from asff_jax.config import load_config_file
from tests.conftest import trace_train_step

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))


def test_all_config_files_are_covered():
  names = {p.stem for p in CONFIGS}
  assert {"default", "digits_aug", "digits_long", "tiny", "coco_baseline_608", "coco_asff_608", "coco_asff_star_608",
          "coco_asff_star_800", "coco_mobilenet_asff_416", "coco_mobilenet_baseline_416"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_traces(path):
  c = load_config_file(path)
  for key in ("seed", "batch_size", "log_every_steps", "checkpoint_every_steps", "eval_every_steps",
              "dataset", "model", "loss", "optimizer", "schedule"):
    assert key in c, (path.name, key)
  model = create_model(c)
  assert len(model.anchors) == 9 and all(w > 0 and h > 0 for w, h in model.anchors)
  if path.stem.startswith("coco_"):
    assert c.model.num_classes == 80 and c.paper_ap > 0  # each recipe documents the paper's AP
  elif path.stem in ("default", "digits_aug", "digits_long"):
    assert c.model.num_classes == 10 and c.dataset.source == "digits"
  s = int(c.dataset.input_size)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3), jnp.float32))
  assert "params" in shapes and "batch_stats" in shapes
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, jnp.zeros((1, s, s, 3)))
  # (B, sum over the three levels of H*W*4 slots, 5 + C) in input pixels, from strides 32, 16, 8.
  n = sum((s // st) * (s // st) * 4 for st in (32, 16, 8))
  assert out["pred"].shape == (1, n, 5 + c.model.num_classes)


def test_digits_aug_is_the_default_with_the_official_geometric_augmentation():
  """configs/digits_aug.py (the recipe of Tables 2–3, the EMA records and digits_long) differs from the
  default only in its augmentation, length, test size, LR, EMA, label smoothing and class-loss weight, with the values those
  records used."""
  default = flatten_dict(load_config_file(CONFIG_DIR / "default.py").to_dict(), sep=".")
  aug = flatten_dict(load_config_file(CONFIG_DIR / "digits_aug.py").to_dict(), sep=".")
  assert aug.keys() == default.keys()
  assert {k for k in aug if aug[k] != default[k]} <= {
      "num_train_steps", "eval.input_size", "optimizer.lr", "optimizer.ema_decay", "loss.label_smoothing",
      "loss.cls_weight", "dataset.augment.crop_p",
      "dataset.augment.expand_p", "dataset.augment.expand_max_scale", "dataset.augment.affine_p"}
  assert (aug["num_train_steps"], aug["eval.input_size"], aug["optimizer.lr"], aug["optimizer.ema_decay"],
          aug["loss.label_smoothing"], aug["loss.cls_weight"]) == (6500, None, 2e-3, 0.0, True, 1.0)
  assert (aug["dataset.augment.crop_p"], aug["dataset.augment.expand_p"], aug["dataset.augment.expand_max_scale"],
          aug["dataset.augment.affine_p"], aug["dataset.augment.flip_p"]) == (1.0, 0.3, 2.0, 0.5, 0.0)


def test_digits_long_trains_on_more_images_than_digits_aug():
  """digits_long is digits_aug with a longer budget: same model, input and augmentation, more images."""
  base = load_config_file(CONFIG_DIR / "digits_aug.py")
  long = load_config_file(CONFIG_DIR / "digits_long.py")
  assert long.model.to_dict() == base.model.to_dict()
  assert long.dataset.to_dict() == base.dataset.to_dict() and long.eval.input_size == base.eval.input_size
  assert long.num_train_steps * long.batch_size > 2 * base.num_train_steps * base.batch_size


def _tiny_from(path, tmp_path):
  """A ``configs/`` recipe shrunk to a seconds-long run: 1/8 width, synthetic 64-px data, 1 step."""
  c = load_config_file(path)
  c.model.width, c.model.num_classes = 0.125, 3
  c.dataset.source, c.dataset.input_size, c.dataset.first_size = "synthetic", 64, 64
  c.dataset.synthetic_image_hw, c.dataset.random_resize, c.dataset.mixup = (64, 80), False, False
  c.eval.input_size, c.batch_size, c.num_train_steps = 64, 2, 1
  c.eval_every_steps, c.eval_at_end, c.write_tensorboard = 0, False, False
  c.init_rng_impl = "rbg"
  return c


@pytest.mark.slow  # compiles the MobileNet step (~60 s on 2 cores); CI traces it (test below)
def test_mobilenet_asff_config_trains_a_step_at_tiny_width(tmp_path):
  """configs/coco_mobilenet_asff_416.py runs a real training step through ``train_and_evaluate``."""
  from asff_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel  (this test only)

  asff = _tiny_from(CONFIG_DIR / "coco_mobilenet_asff_416.py", tmp_path)
  state = train_and_evaluate(asff, str(tmp_path / "asff"), show_progress=False)
  assert int(jax.device_get(state.step)) == 1 and int(jax.device_get(state.nonfinite_count)) == 0


def test_mobilenet_configs_train_step_traces_at_tiny_width(tmp_path):
  """configs/coco_mobilenet_*_416.py: the ASFF recipe's real train step (its optimizer, input pipeline
  and loss) and the baseline's loss gradient trace (``jax.eval_shape``, nothing compiled)."""
  from asff_jax.models import losses  # pylint: disable=import-outside-toplevel  (this test only)

  asff = _tiny_from(CONFIG_DIR / "coco_mobilenet_asff_416.py", tmp_path)
  assert asff.model.backbone == "mobilenet_v2" and asff.model.anchors == "yolov3"
  state, new_state, m, _ = trace_train_step(asff)
  assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)
  assert m["loss"].shape == () and m["loss"].dtype == jnp.float32
  assert "offset" not in str(jax.tree_util.tree_structure(state.params))  # no deformable adaption

  base = _tiny_from(CONFIG_DIR / "coco_mobilenet_baseline_416.py", tmp_path)
  model = create_model(base)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  labels = jnp.zeros((2, 8, 6), jnp.float32).at[:, 0].set(jnp.array([0, 20.0, 20.0, 16.0, 16.0, 1.0]))
  grads = jax.eval_shape(lambda v: jax.grad(lambda p: losses.loss_fn(
      {"params": p, "batch_stats": v["batch_stats"]}, jnp.zeros((2, 64, 64, 3)), labels, model=model,
      config=base, train=True, rng=jax.random.key(0))[0])(v["params"]), shapes)
  assert jax.tree.structure(grads) == jax.tree.structure(shapes["params"])
  assert set(shapes["params"]["fusion_2"]) == {"conv"}  # the mobile baseline's level_2_conv
