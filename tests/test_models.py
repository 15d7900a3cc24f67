"""Model building blocks, variants and invariants (small widths; full width only via eval_shape)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from asff_jax.models import create_model, default_model_config
from asff_jax.models.dcn import deform_conv2d
from asff_jax.models.layers import BatchNorm, ConvBN, drop_block, spp, upsample_nearest
from tests.conftest import random_variables


def small_config(fusion="asff", rfb=False, num_classes=10):
  c = default_model_config()
  c.fusion, c.rfb, c.num_classes = fusion, rfb, num_classes
  c.width, c.stage_blocks = 0.125, (1, 1, 1, 1, 1)
  return c


def _param_count(cfg):
  shapes = jax.eval_shape(create_model(cfg).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("fusion,rfb,expected", [("asff", False, 79_409_493),
                                                  ("none", False, 75_554_428),
                                                  ("asff", True, 86_011_821)])
def test_official_parameter_counts(fusion, rfb, expected):
  cfg = default_model_config()
  cfg.fusion, cfg.rfb = fusion, rfb
  assert _param_count(cfg) == expected


SMALL_HW = (64, 96)


@pytest.fixture(scope="module", params=["asff", "none", "sum", "concat"])
def small_variant(request):
  """(fusion, model, variables, jitted eval apply, jitted train apply) at reduced width."""
  cfg = small_config(request.param)
  model = create_model(cfg)
  variables = random_variables(model, SMALL_HW)  # no init compile
  eval_fn = jax.jit(lambda v, x: model.apply(v, x))
  train_fn = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, dropblock=[(3, 0.9)] * 3,
                                                   mutable=["batch_stats"], rngs={"dropblock": rng}))
  return request.param, model, variables, eval_fn, train_fn


def test_variants_run_reduced_width(small_variant):
  fusion, _, variables, eval_fn, train_fn = small_variant
  x = jax.random.normal(jax.random.key(1), (2, *SMALL_HW, 3))
  out = eval_fn(variables, x)
  n = 4 * (2 * 3 + 4 * 6 + 8 * 12)
  assert out["pred"].shape == (2, n, 15)
  assert [lv["raw"].shape for lv in out["levels"]] == [(2, 2, 3, 60), (2, 4, 6, 60), (2, 8, 12, 60)]
  assert np.isfinite(np.asarray(out["pred"])).all()
  assert ("fusion_weights" in out["levels"][0]) == (fusion == "asff")
  if fusion == "asff":
    for lv in out["levels"]:
      w = np.asarray(lv["fusion_weights"])
      assert w.shape[-1] == 3 and (w >= 0).all()
      np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    # Row order: level 0 first; within a level slot-major, then y, then x.
    cx = np.asarray(out["pred"][0, :4 * 2 * 3, 0]).reshape(4, 2, 3)
    cy = np.asarray(out["pred"][0, :4 * 2 * 3, 1]).reshape(4, 2, 3)
    for xi in range(3):
      assert ((cx[:, :, xi] >= 32 * xi) & (cx[:, :, xi] <= 32 * (xi + 1))).all()
    for yi in range(2):
      assert ((cy[:, yi, :] >= 32 * yi) & (cy[:, yi, :] <= 32 * (yi + 1))).all()
  # Training mode (with DropBlock active) updates every batch statistic.
  out_t, upd = train_fn(variables, x, jax.random.key(2))
  assert np.isfinite(np.asarray(out_t["pred"])).all()
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         upd["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("fusion", ["none", "sum", "concat"])
def test_variants_run_full_width(fusion):
  cfg = default_model_config()
  cfg.fusion = fusion
  model = create_model(cfg)
  variables = random_variables(model)
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.zeros((1, 64, 64, 3)))
  assert out["pred"].shape == (1, 4 * (4 + 16 + 64), 85)
  assert [lv["head_input"].shape[-1] for lv in out["levels"]] == [1024, 512, 256]
  assert np.isfinite(np.asarray(out["pred"])).all()


def test_bfloat16_compute_float32_params():
  cfg = small_config("asff")
  model32 = create_model(cfg)
  variables = jax.jit(model32.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  cfg.dtype = "bfloat16"
  model16 = create_model(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  x = jax.random.normal(jax.random.key(3), (1, 64, 64, 3))
  out16 = jax.jit(lambda v, x: model16.apply(v, x))(variables, x)
  out32 = jax.jit(lambda v, x: model32.apply(v, x))(variables, x)
  assert out16["pred"].dtype == jnp.float32
  assert out16["levels"][2]["adapted"].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out16["pred"])).all()
  rel = lambda a, b: (np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                      / np.linalg.norm(np.asarray(b, np.float64)))
  # bf16 keeps ~3 significant digits: the fused features stay within ~1%
  # (relative L2) of float32 through ~70 conv layers. The deformable conv then
  # samples at offsets predicted from bf16 features; in this random-init net the
  # sampled features vary fast in space, so the head outputs drift more (~6%).
  for l in range(3):
    assert rel(out16["levels"][l]["head_input"], out32["levels"][l]["head_input"]) < 0.03
    assert rel(out16["levels"][l]["raw"], out32["levels"][l]["raw"]) < 0.15
  # The DCN itself, on identical inputs and offsets, loses only bf16 rounding.
  r = np.random.default_rng(0)
  xd = jnp.asarray(r.standard_normal((1, 16, 16, 32)), jnp.float32)
  off = jnp.asarray(r.standard_normal((1, 16, 16, 72)) * 2, jnp.float32)
  k = jnp.asarray(r.standard_normal((3, 3, 32, 32)) / 17, jnp.float32)
  d16 = deform_conv2d(xd.astype(jnp.bfloat16), off, k.astype(jnp.bfloat16), groups=4)
  assert rel(d16, deform_conv2d(xd, off, k, groups=4)) < 0.01


def test_input_validation():
  model = create_model(small_config())
  with pytest.raises(ValueError, match="multiples of 32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 60, 64, 3)))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
  bad = small_config()
  bad.fusion = "attention"
  with pytest.raises(ValueError, match="model.fusion"):
    create_model(bad)
  bad = small_config()
  bad.anchors = "yolov9"
  with pytest.raises(ValueError, match="anchor"):
    create_model(bad)


# ---------------------------------------------------------------- layers


def test_convbn_symmetric_padding_matches_torch_stride2():
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 3)).astype(np.float32)
  m = ConvBN(4, 3, stride=2)
  v = m.init(jax.random.key(0), jnp.asarray(x), train=False)
  ours = np.asarray(m.apply(v, jnp.asarray(x), train=False))
  w = np.asarray(v["params"]["conv"]["kernel"]).transpose(3, 2, 0, 1)
  ref = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(w),
                                   stride=2, padding=1)
  ref = torch.nn.functional.leaky_relu(ref, 0.1).numpy().transpose(0, 2, 3, 1)
  assert ours.shape == (1, 4, 4, 4)
  np.testing.assert_allclose(ours, ref / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-5)


def test_batchnorm_train_matches_torch_including_running_stats():
  x = np.random.default_rng(1).standard_normal((3, 5, 4, 6)).astype(np.float32) * 2 + 1
  bn = BatchNorm()
  v = bn.init(jax.random.key(0), jnp.asarray(x), train=False)
  y, upd = bn.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
  tbn = torch.nn.BatchNorm2d(6)
  tbn.train()
  ty = tbn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(y), ty, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_spp_and_upsample():
  x = np.random.default_rng(2).standard_normal((1, 13, 13, 2)).astype(np.float32)
  out = np.asarray(spp(jnp.asarray(x)))
  t = torch.from_numpy(x.transpose(0, 3, 1, 2))
  pools = [t] + [torch.nn.functional.max_pool2d(t, k, 1, k // 2) for k in (5, 9, 13)]
  ref = torch.cat(pools, 1).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(out, ref)
  up = np.asarray(upsample_nearest(jnp.asarray(x), 4))
  np.testing.assert_array_equal(up, x.repeat(4, axis=1).repeat(4, axis=2))


def test_dropblock():
  x = jnp.ones((4, 16, 16, 8))
  y = np.asarray(drop_block(x, jax.random.key(0), 3, 0.9))
  dropped = y == 0
  assert 0.02 < dropped.mean() < 0.3
  np.testing.assert_allclose(y.mean(), 1.0, rtol=1e-5)  # rescaled by numel / sum(mask)
  # Every dropped pixel lies in a fully dropped 3x3 block (dilated seeds).
  for b, i, j, c in zip(*np.nonzero(dropped)):
    ok = any(dropped[b, max(i - di, 0):i - di + 3, max(j - dj, 0):j - dj + 3, c].all()
             for di in range(3) for dj in range(3) if i - di >= -1 and j - dj >= -1)
    assert ok
  with pytest.raises(ValueError, match="odd"):
    drop_block(x, jax.random.key(0), 4, 0.9)
  # Identity at eval and with keep_prob 1 (the DropBlock layer itself).
  from asff_jax.models.layers import DropBlock
  layer = DropBlock()
  img = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
  rngs = {"dropblock": jax.random.key(5)}
  np.testing.assert_array_equal(layer.apply({}, img, True, (3, 1.0), rngs=rngs), img)
  np.testing.assert_array_equal(layer.apply({}, img, False, (3, 0.5), rngs=rngs), img)
  np.testing.assert_array_equal(layer.apply({}, img, True, None, rngs=rngs), img)
  assert not np.allclose(layer.apply({}, img, True, (3, 0.5), rngs=rngs), img)


# ---------------------------------------------------------------- deformable conv


def _naive_dcn(x, offset, kernel, bias, groups):
  """Direct per-pixel DCNv1 in float64 numpy, following the CUDA kernel's rules."""
  b, h, w, c = x.shape
  kh, kw, _, co = kernel.shape
  cg = c // groups
  out = np.zeros((b, h, w, co))
  for n in range(b):
    for y in range(h):
      for xx in range(w):
        col = np.zeros((kh, kw, c))
        for g in range(groups):
          for i in range(kh):
            for j in range(kw):
              k = i * kw + j
              dy = offset[n, y, xx, 2 * (g * kh * kw + k)]
              dx = offset[n, y, xx, 2 * (g * kh * kw + k) + 1]
              py, px = y - 1 + i + dy, xx - 1 + j + dx
              val = np.zeros(cg)
              if -1 < py < h and -1 < px < w:
                y0, x0 = int(np.floor(py)), int(np.floor(px))
                for yy, xc, wt in ((y0, x0, (1 - (py - y0)) * (1 - (px - x0))),
                                   (y0, x0 + 1, (1 - (py - y0)) * (px - x0)),
                                   (y0 + 1, x0, (py - y0) * (1 - (px - x0))),
                                   (y0 + 1, x0 + 1, (py - y0) * (px - x0))):
                  if 0 <= yy < h and 0 <= xc < w:
                    val += wt * x[n, yy, xc, g * cg:(g + 1) * cg]
              col[i, j, g * cg:(g + 1) * cg] = val
        out[n, y, xx] = np.einsum("ijc,ijco->o", col, kernel) + bias
  return out


@pytest.mark.parametrize("formulation", ["corners", "patches"])
def test_deform_conv_matches_naive_reference(formulation):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 6, 8))
  offset = rng.standard_normal((2, 5, 6, 72)) * 1.5  # crosses borders
  kernel = rng.standard_normal((3, 3, 8, 5))
  bias = rng.standard_normal(5)
  ours = np.asarray(deform_conv2d(*(jnp.asarray(a, jnp.float32) for a in (x, offset, kernel, bias)), groups=4,
                                  formulation=formulation))
  ref = _naive_dcn(x, offset, kernel, bias, 4)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("formulation", ["corners", "patches"])
def test_deform_conv_zero_and_integer_offsets_equal_plain_conv(formulation):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 7, 7, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 4)), jnp.float32)
  plain = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  zero = deform_conv2d(x, jnp.zeros((1, 7, 7, 72)), kernel, groups=4, formulation=formulation)
  np.testing.assert_allclose(np.asarray(zero), np.asarray(plain), rtol=1e-5, atol=1e-5)
  # A uniform integer shift (dy=0, dx=+1) equals the plain conv of the input shifted left.
  off = jnp.zeros((1, 7, 7, 4, 9, 2)).at[..., 1].set(1.0).reshape(1, 7, 7, 72)
  shifted = jnp.pad(x[:, :, 1:], ((0, 0), (0, 0), (0, 1), (0, 0)))
  ref = jax.lax.conv_general_dilated(shifted, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # Equal away from the left border (there the DCN reads column 0, the shifted input its padding).
  np.testing.assert_allclose(np.asarray(deform_conv2d(x, off, kernel, groups=4, formulation=formulation))[:, :, 1:],
                             np.asarray(ref)[:, :, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("formulation", ["corners", "patches"])
def test_deform_conv_gradients_finite_difference(formulation):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((1, 4, 4, 4)))
  off = jnp.asarray(rng.uniform(-0.8, 0.8, (1, 4, 4, 18)))  # avoid integer kinks
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 2)))
  f = lambda x, o, k: jnp.sum(jnp.sin(deform_conv2d(x, o, k, groups=1, formulation=formulation)))
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (x, off, kernel)]
    from jax.test_util import check_grads
    check_grads(f, args, order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


def test_deform_conv_formulations_agree_in_values_and_gradients():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 8)), jnp.float32)
  off = jnp.asarray(rng.standard_normal((2, 6, 5, 72)) * 2.0, jnp.float32)  # many samples off the map
  k = jnp.asarray(rng.standard_normal((3, 3, 8, 3)), jnp.float32)
  f = {m: (lambda x, o, k, m=m: jnp.sum(jnp.tanh(deform_conv2d(x, o, k, groups=4, formulation=m))))
       for m in ("corners", "patches")}
  np.testing.assert_allclose(f["patches"](x, off, k), f["corners"](x, off, k), rtol=1e-5)
  ga = jax.grad(f["corners"], argnums=(0, 1, 2))(x, off, k)
  gb = jax.grad(f["patches"], argnums=(0, 1, 2))(x, off, k)
  for a, b in zip(ga, gb):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="formulation"):
    deform_conv2d(x, off, k, groups=4, formulation="taps")


def test_model_dcn_formulation_option_same_outputs():
  """``model.dcn_formulation='patches'``: same parameters, same outputs as the default."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from asff_jax.models import create_model, default_model_config, random_variables  # pylint: disable=import-outside-toplevel

  c = ml_collections.ConfigDict({"model": default_model_config()})
  c.model.width, c.model.stage_blocks, c.model.num_classes = 0.125, (1, 1, 1, 1, 1), 3
  m0 = create_model(c)
  c.model.dcn_formulation = "patches"
  m1 = create_model(c)
  v = random_variables(m0, (64, 64))
  assert jax.tree.structure(v) == jax.tree.structure(random_variables(m1, (64, 64)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  out = [jax.jit(m.apply)(v, x)["pred"] for m in (m1, m0)]  # jitted: eager dispatch is slower on CPU
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(out[1]), rtol=1e-4, atol=1e-4)
  c.model.dcn_formulation = "taps"
  with pytest.raises(ValueError, match="dcn_formulation"):
    create_model(c)

@pytest.mark.parametrize("stride,hw", [(1, (9, 7)), (2, (10, 10)), (2, (9, 12))])
def test_depthwise_conv_matches_grouped_lax_conv_values_and_gradients(stride, hw):
  """layers.depthwise_conv (shifted sums, fast on CPU) = lax.conv with feature_group_count = C."""
  from asff_jax.models.layers import depthwise_conv  # pylint: disable=import-outside-toplevel  (this test only)

  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 1, 5)), jnp.float32)
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                  feature_group_count=5)
  ours = lambda x, k: depthwise_conv(x, k, stride)
  np.testing.assert_allclose(ours(x, k), ref(x, k), atol=1e-5)
  w = jnp.asarray(rng.standard_normal(ref(x, k).shape), jnp.float32)
  g_ours = jax.grad(lambda x, k: jnp.sum(ours(x, k) * w), argnums=(0, 1))(x, k)
  g_ref = jax.grad(lambda x, k: jnp.sum(ref(x, k) * w), argnums=(0, 1))(x, k)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4)
