"""Gradient-consistency probes: the decomposition is exact and the statistics are well defined."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from asff_jax.models.losses import default_loss_config, head_loss, loss_fn
from asff_jax.models import create_model, default_model_config
from asff_jax.tools.probes import SplitModel, cell_statistics, decompose_gradients, summarize

S = 64


def _setup(fusion):
  cfg = ml_collections.ConfigDict({"model": default_model_config(), "loss": default_loss_config()})
  cfg.model.width, cfg.model.stage_blocks, cfg.model.num_classes, cfg.model.fusion = 0.125, (1, 1, 1, 1, 1), 3, fusion
  # Official anchors / 4 so that a 64-px input has objects on every level.
  from asff_jax.models.config import OFFICIAL_ANCHORS
  with cfg.ignore_type():
    cfg.model.anchors = [(w / 4, h / 4) for w, h in OFFICIAL_ANCHORS]
  model = create_model(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, S, S, 3)))
  images = jax.random.normal(jax.random.key(1), (2, S, S, 3))
  labels = np.zeros((2, 6, 5), np.float32)
  # Boxes whose best anchor is on level 0 (stride 32), 1 (16) and 2 (8).
  labels[0, :3] = [[0, 30, 34, 40, 50], [1, 14, 40, 10, 28], [2, 50, 12, 4, 7]]
  labels[1, :2] = [[1, 33, 30, 30, 58], [0, 20, 20, 15, 11]]
  return cfg, model, variables, images, jnp.asarray(labels)


# asff in CI; sum and concat (the same decomposition through a weightless fusion, ~20 s each) under -m slow
@pytest.mark.parametrize("fusion", ["asff", pytest.param("sum", marks=pytest.mark.slow),
                                    pytest.param("concat", marks=pytest.mark.slow)])
def test_contributions_add_up_to_full_gradient(fusion):
  cfg, model, variables, images, labels = _setup(fusion)
  split = SplitModel(model, variables, train=True)

  # The split model is the same function as the full model.
  xs = jax.jit(split.features)(images)
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
  for n in range(3):
    np.testing.assert_allclose(np.asarray(xs[n]), np.asarray(out["neck"][n]), rtol=1e-5, atol=1e-5)

  def total_from_features(xs_):
    levels = [split.level(l, xs_)[1] for l in range(3)]
    return head_loss(levels, labels, loss_config=cfg.loss, num_classes=3, input_hw=(S, S),
                     anchors=model.anchors)[0]

  full_loss, _ = jax.jit(lambda v, x, y: loss_fn(v, x, y, model=model, config=cfg))(variables, images, labels)
  loss_split, full_grad = jax.jit(jax.value_and_grad(total_from_features))(xs)
  np.testing.assert_allclose(float(loss_split), float(full_loss), rtol=1e-5)

  res = jax.jit(lambda v, x, y: decompose_gradients(model, v, x, y, loss_config=cfg.loss))(variables, images, labels)
  np.testing.assert_allclose(float(res["level_loss"].sum()), float(full_loss), rtol=1e-5)
  for n in range(3):
    summed = sum(np.asarray(res["contrib"][n][l], np.float64) for l in range(3))
    ref = np.asarray(full_grad[n], np.float64)
    # Equal up to float32 summation order (relative L2).
    assert np.linalg.norm(summed - ref) / np.linalg.norm(ref) < 1e-4
    # Every path carries gradient: fusion couples all levels.
    assert all(np.abs(np.asarray(res["contrib"][n][l])).max() > 0 for l in range(3))

  stats = summarize(jax.tree.map(np.asarray, res))
  for n in range(3):
    s = stats[n]
    assert s["num_positive"] > 0
    np.testing.assert_allclose(sum(s["share"]), 1.0, rtol=1e-6)
    assert -1.0 <= s["cos_own_vs_others"] <= 1.0 and 0.0 <= s["conflict_frac"] <= 1.0
    if fusion == "asff":
      assert 0 < s["w_self"] < 1 and all(0 < w < 1 for w in s["w_to"])
      assert s["w_to"][n] == pytest.approx(s["w_self"])
  # The per-cell statistics pool to summarize()'s numbers; ASFF weights sum to 1 on the background too.
  cells = cell_statistics(jax.tree.map(np.asarray, res))
  for n in range(3):
    c = cells[n]
    assert len(c["image"]) == stats[n]["num_positive"] and set(c["image"]) <= set(range(len(images)))
    np.testing.assert_allclose(c["share"].mean(0), stats[n]["share"], rtol=1e-12)
    assert float((c["cos"] < 0).mean()) == stats[n]["conflict_frac"]
    if fusion == "asff":
      np.testing.assert_allclose(c["w_pos"][:, n], c["w_self"], rtol=0)
      np.testing.assert_allclose(c["w_bg_sum"].sum(-1), c["bg_count"], rtol=1e-5)
      h, w = np.asarray(res["positive"][n]).shape[1:]
      np.testing.assert_array_equal(c["bg_count"] + np.bincount(c["image"], minlength=len(images)), h * w)
    else:
      assert "w_self" not in s


def test_no_fusion_paths_vanish_for_baseline():
  cfg, model, variables, images, labels = _setup("none")
  res = jax.jit(lambda v, x, y: decompose_gradients(model, v, x, y, loss_config=cfg.loss))(variables, images, labels)
  for n in range(3):
    for l in range(3):
      g = np.abs(np.asarray(res["contrib"][n][l])).max()
      assert (g > 0) == (l == n), (n, l, g)
