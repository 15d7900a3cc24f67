"""Parity with the official PyTorch model (../shared/parity, see its README).

The official model was run with deterministic random weights regenerated from
``state_dict_spec*.json``; we regenerate the same state dict, load it through
our converter, run our model on the stored input and compare every stage the
model exposes.

Tolerances (float32 on CPU):

* Feature maps (backbone, neck, fusion outputs and weights, head outputs): the
  max abs error must be ≤ 1e-4 × max|reference| of that tensor. An
  element-wise relative tolerance is meaningless for activations that cross
  zero; scaling by the tensor's magnitude is the README's "1e-4 relative".
  Measured errors are ≤ 4e-6 of the scale (different conv summation order and
  our DCN's arithmetic).
* ``pred``: element-wise rtol 1e-4 for boxes (all positive; ``exp`` amplifies
  the raw-output error, measured ≤ 6e-6), atol 1e-5 for probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asff_jax.tools.convert import variables_from_official
from asff_jax.models import create_model, default_model_config
from asff_jax.tools.parity import state_dict_from_spec
from tests.conftest import parity_file

SCALE_TOL = 1e-4


def _nhwc(a):
  return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _assert_close_scaled(name, ours, ref):
  ours, ref = np.asarray(ours, np.float64), _nhwc(np.asarray(ref, np.float64))
  assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs official {ref.shape}"
  err = np.abs(ours - ref).max()
  scale = np.abs(ref).max()
  assert err <= SCALE_TOL * scale, f"{name}: max abs err {err:.3e} > {SCALE_TOL} x {scale:.3e}"


def _run(spec_name, rfb):
  cfg = default_model_config()
  cfg.rfb = rfb
  sd = state_dict_from_spec(parity_file(spec_name))
  variables = variables_from_official(sd, cfg)
  io = np.load(parity_file("asff_official_io.npz"))
  x = jnp.asarray(_nhwc(io["input"]))
  model = create_model(cfg)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return jax.tree.map(np.asarray, out), io


@pytest.fixture(scope="module")
def asff_run():
  return _run("state_dict_spec.json", rfb=False)


@pytest.fixture(scope="module")
def asff_star_run():
  out, io_main = _run("state_dict_spec_rfb.json", rfb=True)
  return out, np.load(parity_file("asff_rfb_official_io.npz")), io_main


def test_backbone_and_neck(asff_run):
  out, io = asff_run
  for i, key in enumerate(["c3", "c4", "c5"]):
    _assert_close_scaled(f"backbone_{key}", out["backbone"][i], io[f"backbone_{key}"])
  for l in range(3):
    _assert_close_scaled(f"neck_l{l}", out["neck"][l], io[f"neck_l{l}"])


@pytest.mark.parametrize("level", [0, 1, 2])
def test_fusion_and_head(asff_run, level):
  out, io = asff_run
  lv = out["levels"][level]
  _assert_close_scaled(f"asff_out_l{level}", lv["head_input"], io[f"asff_out_l{level}"])
  _assert_close_scaled(f"asff_weights_l{level}", lv["fusion_weights"], io[f"asff_weights_l{level}"])
  _assert_close_scaled(f"asff_fused_sum_l{level}", lv["fused_sum"], io[f"asff_fused_sum_l{level}"][:, :, :])
  np.testing.assert_allclose(lv["fusion_weights"].sum(-1), 1.0, atol=1e-5)
  _assert_close_scaled(f"head_guide_wh_l{level}", lv["guide_wh"], io[f"head_guide_wh_l{level}"])
  _assert_close_scaled(f"head_offset_l{level}", lv["offset"], io[f"head_offset_l{level}"])
  _assert_close_scaled(f"head_adapted_l{level}", lv["adapted"], io[f"head_adapted_l{level}"])
  _assert_close_scaled(f"head_raw_l{level}", lv["raw"], io[f"head_raw_l{level}"])


def _assert_pred(ours, ref):
  assert ours.shape == ref.shape == (1, 14196, 85)
  np.testing.assert_allclose(ours[..., :4], ref[..., :4], rtol=1e-4)
  np.testing.assert_allclose(ours[..., 4:], ref[..., 4:], atol=1e-5)


def test_pred(asff_run):
  out, io = asff_run
  _assert_pred(out["pred"], io["pred"])


@pytest.mark.parametrize("level", [0, 1, 2])
def test_asff_star_heads(asff_star_run, level):
  out, io, _ = asff_star_run
  lv = out["levels"][level]
  _assert_close_scaled(f"rfb asff_out_l{level}", lv["head_input"], io[f"asff_out_l{level}"])
  _assert_close_scaled(f"rfb asff_weights_l{level}", lv["fusion_weights"], io[f"asff_weights_l{level}"])
  _assert_close_scaled(f"rfb asff_fused_sum_l{level}", lv["fused_sum"], io[f"asff_fused_sum_l{level}"])
  _assert_close_scaled(f"rfb head_rfb_l{level}", lv["rfb"], io[f"head_rfb_l{level}"])
  _assert_close_scaled(f"rfb head_guide_wh_l{level}", lv["guide_wh"], io[f"head_guide_wh_l{level}"])
  _assert_close_scaled(f"rfb head_offset_l{level}", lv["offset"], io[f"head_offset_l{level}"])
  _assert_close_scaled(f"rfb head_raw_l{level}", lv["raw"], io[f"head_raw_l{level}"])


def test_asff_star_pred_and_shared_trunk(asff_star_run):
  out, io, io_main = asff_star_run
  _assert_pred(out["pred"], io["pred"])
  # The README: backbone and neck are bit-identical to the main fixture's.
  for l in range(3):
    _assert_close_scaled(f"rfb neck_l{l}", out["neck"][l], io_main[f"neck_l{l}"])


# ----------------------------------------------------------------------------- strong baseline


@pytest.fixture(scope="module")
def baseline_run():
  cfg = default_model_config()
  cfg.fusion = "none"
  variables = variables_from_official(state_dict_from_spec(parity_file("state_dict_spec_baseline.json")), cfg)
  io_main = np.load(parity_file("asff_official_io.npz"))
  model = create_model(cfg)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(_nhwc(io_main["input"])))
  return jax.tree.map(np.asarray, out), np.load(parity_file("baseline_official_io.npz")), io_main


def test_baseline_trunk(baseline_run):
  """The baseline's backbone and level-0 neck are the ASFF fixture's (its README); level 1 its own route."""
  out, io, io_main = baseline_run
  for i, key in enumerate(["c3", "c4", "c5"]):
    _assert_close_scaled(f"baseline backbone_{key}", out["backbone"][i], io_main[f"backbone_{key}"])
  _assert_close_scaled("baseline neck_l0", out["neck"][0], io_main["neck_l0"])
  _assert_close_scaled("baseline neck_l1", out["neck"][1], io["neck_l1"])


@pytest.mark.parametrize("level", [0, 1, 2])
def test_baseline_heads(baseline_run, level):
  out, io, _ = baseline_run
  lv = out["levels"][level]
  # the per-level 3x3 conv-BN-leaky output (module_list.18/27/36); at level 2 it is the neck's last layer
  _assert_close_scaled(f"baseline head_input_l{level}", lv["head_input"], io[f"head_input_l{level}"])
  if level == 2:
    _assert_close_scaled("baseline neck (P3)", out["neck"][2], io["head_input_l2"])
  _assert_close_scaled(f"baseline head_guide_wh_l{level}", lv["guide_wh"], io[f"head_guide_wh_l{level}"])
  _assert_close_scaled(f"baseline head_offset_l{level}", lv["offset"], io[f"head_offset_l{level}"])
  _assert_close_scaled(f"baseline head_adapted_l{level}", lv["adapted"], io[f"head_adapted_l{level}"])
  _assert_close_scaled(f"baseline head_raw_l{level}", lv["raw"], io[f"head_raw_l{level}"])
  assert "fusion_weights" not in lv


def test_baseline_pred_and_detections(baseline_run):
  from asff_jax.evaluation import postprocess  # pylint: disable=import-outside-toplevel  (this test only)

  out, io, _ = baseline_run
  _assert_pred(out["pred"], io["pred"])
  _assert_detections(postprocess.postprocess_reference(out["pred"], conf_thre=0.01, nms_thre=0.65)[0],
                     io["detections"])


def _assert_detections(got, want, min_iou=0.999):
  """The fixture README's check: the same rows per class, each official box matched one to one (IoU > 0.999)."""
  assert got.shape == want.shape, (got.shape, want.shape)
  for c in np.unique(want[:, 6]):
    g, w = got[got[:, 6] == c, :4].astype(np.float64), want[want[:, 6] == c, :4].astype(np.float64)
    assert len(g) == len(w), f"class {c}: {len(g)} vs {len(w)} detections"
    tl, br = np.maximum(w[:, None, :2], g[None, :, :2]), np.minimum(w[:, None, 2:], g[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), -1)
    area = lambda b: np.prod(b[:, 2:] - b[:, :2], -1)
    iou = inter / (area(w)[:, None] + area(g)[None, :] - inter)
    used = np.zeros(len(g), bool)
    for i in np.argsort(-iou.max(1)):
      j = int(np.argmax(np.where(used, -1.0, iou[i])))
      assert iou[i, j] > min_iou, f"class {c}: official box {w[i]} unmatched (best IoU {iou[i, j]:.6f})"
      used[j] = True
