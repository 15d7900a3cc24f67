"""Parity with the official MobileNetV2 models (``yolov3_mobilev2.py``; ../shared/parity README, part 2 and 3).

MobileNetV2 + ASFF (``asff=True``) and the MobileNetV2 baseline, loaded through
our converter from the regenerated official state dicts, against every stored
stage: the backbone's stage ends, the neck routes, ``ASFFmobile`` outputs,
weights and fused sums, the heads' ``guide_wh`` and raw outputs (no deformable
adaption: the official ``sep=True`` heads), ``pred`` with the (373, 326)
anchor, and the detections. Tolerances are the fixture README's (same as
``tests/test_parity.py``): stage arrays max abs err ≤ 1e-4 × max |ref|; ``pred``
boxes rtol 1e-4, scores atol 1e-5; detections row for row.

Two things the random-weight fixtures exercise weakly get their own checks:
ReLU6's upper clip outside the backbone, and the level-1 path of the level-2
``ASFFmobile`` fusion (``compress_level_1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asff_jax.evaluation import postprocess
from asff_jax.models import create_model, default_model_config
from asff_jax.models.fusion import LevelFusion, MOBILE_INTER
from asff_jax.models.layers import ConvBN
from asff_jax.models.official_weights import variables_from_official
from asff_jax.tools.parity import state_dict_from_spec
from tests.conftest import parity_file
from tests.test_parity import _assert_close_scaled, _assert_detections, _assert_pred, _nhwc

BACKBONE_LAYERS = (0, 1, 3, 10, 16, 17)


def mobile_config(fusion: str = "asff"):
  cfg = default_model_config()
  cfg.backbone, cfg.fusion, cfg.anchors = "mobilenet_v2", fusion, "yolov3"
  return cfg


def _run(spec: str, fusion: str):
  cfg = mobile_config(fusion)
  variables = variables_from_official(state_dict_from_spec(parity_file(spec)), cfg)
  x = jnp.asarray(_nhwc(np.load(parity_file("asff_official_io.npz"))["input"]))
  model = create_model(cfg)

  def forward(v, x):
    out = model.apply(v, x, train=False)
    _, stages = model.apply(v, x, False, True, method=lambda m, x, t, a: m.backbone(x, t, return_all=a))
    return out, [stages[i] for i in BACKBONE_LAYERS]

  out, stages = jax.jit(forward)(variables, x)
  return jax.tree.map(np.asarray, out), [np.asarray(s) for s in stages]


@pytest.fixture(scope="module")
def mobile_asff():
  out, stages = _run("state_dict_spec_mobile_asff.json", "asff")
  return out, stages, np.load(parity_file("mobile_asff_official_io.npz"))


@pytest.fixture(scope="module")
def mobile_baseline():
  out, _ = _run("state_dict_spec_mobile_baseline.json", "none")
  return out, np.load(parity_file("mobile_baseline_official_io.npz"))


def test_mobile_backbone_and_neck(mobile_asff):
  out, stages, io = mobile_asff
  for i, got in zip(BACKBONE_LAYERS, stages):
    _assert_close_scaled(f"backbone_layer{i}", got, io[f"backbone_layer{i}"])
  for i, key in enumerate(["c3", "c4", "c5"]):
    _assert_close_scaled(f"backbone_{key}", out["backbone"][i], io[f"backbone_{key}"])
  for l in range(3):
    _assert_close_scaled(f"neck_l{l}", out["neck"][l], io[f"neck_l{l}"])


@pytest.mark.parametrize("level", [0, 1, 2])
def test_mobile_asff_and_heads(mobile_asff, level):
  out, _, io = mobile_asff
  lv = out["levels"][level]
  _assert_close_scaled(f"asff_out_l{level}", lv["head_input"], io[f"asff_out_l{level}"])
  _assert_close_scaled(f"asff_weights_l{level}", lv["fusion_weights"], io[f"asff_weights_l{level}"])
  _assert_close_scaled(f"asff_fused_sum_l{level}", lv["fused_sum"], io[f"asff_fused_sum_l{level}"])
  np.testing.assert_allclose(lv["fusion_weights"].sum(-1), 1.0, atol=1e-5)
  _assert_close_scaled(f"head_guide_wh_l{level}", lv["guide_wh"], io[f"head_guide_wh_l{level}"])
  _assert_close_scaled(f"head_raw_l{level}", lv["raw"], io[f"head_raw_l{level}"])
  # sep=True heads: no deformable adaption, the prediction conv reads the head input
  assert "offset" not in lv
  np.testing.assert_array_equal(lv["adapted"], lv["head_input"])


def test_mobile_asff_pred_and_detections(mobile_asff):
  out, _, io = mobile_asff
  _assert_pred(out["pred"], io["pred"])
  _assert_detections(postprocess.postprocess_reference(out["pred"], conf_thre=0.01, nms_thre=0.65)[0],
                     io["detections"])


@pytest.mark.parametrize("level", [0, 1, 2])
def test_mobile_baseline_heads(mobile_baseline, level):
  out, io = mobile_baseline
  lv = out["levels"][level]
  _assert_close_scaled(f"mobile baseline head_input_l{level}", lv["head_input"], io[f"head_input_l{level}"])
  _assert_close_scaled(f"mobile baseline head_guide_wh_l{level}", lv["guide_wh"], io[f"head_guide_wh_l{level}"])
  _assert_close_scaled(f"mobile baseline head_raw_l{level}", lv["raw"], io[f"head_raw_l{level}"])
  assert "fusion_weights" not in lv and "offset" not in lv


def test_mobile_baseline_pred_and_detections(mobile_baseline):
  out, io = mobile_baseline
  _assert_pred(out["pred"], io["pred"])
  _assert_detections(postprocess.postprocess_reference(out["pred"], conf_thre=0.01, nms_thre=0.65)[0],
                     io["detections"])


# ------------------------------------------------------------------ what the fixtures exercise weakly


def test_relu6_clips_above_six_in_neck_and_fusion_convs():
  """The fixture README: no pre-activation outside the backbone exceeds 6, so a port with plain ReLU
  there would match it exactly. Drive a conv-BN-ReLU6 (as in the neck and ASFFmobile) past 6."""
  conv = ConvBN(4, 1, act="relu6")
  x = jnp.linspace(-20.0, 20.0, 2 * 3 * 3 * 4).reshape(2, 3, 3, 4)
  eye = {"params": {"conv": {"kernel": jnp.eye(4)[None, None]},
                    "batch_norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
         "batch_stats": {"batch_norm": {"mean": jnp.zeros(4), "var": jnp.ones(4) - 1e-5}}}
  y = conv.apply(eye, x, False)
  np.testing.assert_allclose(y, np.clip(np.asarray(x), 0, 6), atol=1e-5)
  assert float(y.max()) == pytest.approx(6.0) and float(jnp.max(x)) > 6
  # and the model uses it: every neck and fusion ConvBN of the MobileNetV2 model is ReLU6
  model = create_model(mobile_config())
  acts = set()

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ConvBN) and context.method_name == "__call__":
      acts.add((context.module.path[0] if context.module.path else "", context.module.act))
    return next_fun(*args, **kwargs)

  import flax.linen as nn  # pylint: disable=import-outside-toplevel  (this test only)
  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  tops = {t for t, _ in acts}
  assert {"neck", "fusion_0", "fusion_1", "fusion_2"} <= tops
  assert {a for t, a in acts if t != "backbone"} == {"relu6"}


def test_level2_asff_mobile_level1_path():
  """x^{1→2} = upsample×2(compress_level_1(x^1)): 1×1 conv-BN-ReLU6 256→128, then nearest ×2.

  On the fixture that path carries ~1 % of the level-2 output (its weight averages 0.013), so here
  it is checked on its own: with the fusion weights forced to level 1 only, the fused sum is
  exactly that path's output summed over channels."""
  fusion = LevelFusion(2, "asff", 16, 1.0, inter=MOBILE_INTER, act="relu6")
  rng = np.random.default_rng(0)
  xs = (jnp.asarray(rng.standard_normal((1, 2, 2, 512)), jnp.float32),
        jnp.asarray(rng.standard_normal((1, 4, 4, 256)), jnp.float32),
        jnp.asarray(rng.standard_normal((1, 8, 8, 128)), jnp.float32))
  variables = jax.tree.map(np.asarray, fusion.init(jax.random.key(1), xs, False))
  params = variables["params"]
  assert params["resize"]["compress_level_1"]["conv"]["kernel"].shape == (1, 1, 256, 128)
  assert "compress_level_1" not in LevelFusion(2, "asff", 16, 1.0).init(
      jax.random.key(1), (xs[0], xs[1], jnp.zeros((1, 8, 8, 256))), False)["params"]["resize"]
  # weights: a huge bias on level 1's logit -> beta = 1
  params["weight_levels"]["kernel"] = np.zeros_like(params["weight_levels"]["kernel"])
  params["weight_levels"]["bias"] = np.array([-50.0, 50.0, -50.0], np.float32)
  out = fusion.apply(variables, xs, False)
  np.testing.assert_allclose(out["weights"][..., 1], 1.0, atol=1e-6)
  k = params["resize"]["compress_level_1"]["conv"]["kernel"][0, 0]
  bn = params["resize"]["compress_level_1"]["batch_norm"]
  stats = variables["batch_stats"]["resize"]["compress_level_1"]["batch_norm"]
  h = np.asarray(xs[1]) @ k
  h = (h - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
  h = np.clip(h, 0, 6).repeat(2, axis=1).repeat(2, axis=2)
  np.testing.assert_allclose(out["fused_sum"], h.sum(-1), rtol=1e-4, atol=1e-4)
