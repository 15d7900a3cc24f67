"""The per-tap kernel gradient (:mod:`asff_jax.models.conv_grad`) against ``jax.grad`` of the plain conv."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from asff_jax.models import conv_grad

DN = ("NHWC", "HWIO", "NHWC")


def _grads(conv, x, w, stride, pad, ct):
  f = lambda x_, w_: (conv(x_, w_, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=DN) * ct).sum()
  return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)


# 3x3 stride 1 / stride 2 (odd and even inputs), 1x1, and a non-square input
@pytest.mark.parametrize("k,stride,hw", [(3, 1, (9, 9)), (3, 2, (10, 10)), (3, 2, (9, 11)), (1, 1, (8, 6)),
                                          (5, 1, (7, 7))])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_taps_gradient_equals_xla(k, stride, hw, dtype):
  with jax.enable_x64(dtype == "float64"):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, *hw, 5)), dtype)
    w = jnp.asarray(rng.standard_normal((k, k, 5, 7)), dtype)
    pad = (k - 1) // 2
    y = lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=DN)
    ct = jnp.asarray(rng.standard_normal(y.shape), dtype)
    with conv_grad.conv_kernel_grad("taps"):
      ours = _grads(conv_grad.conv_general_dilated, x, w, stride, pad, ct)
      y_ours = conv_grad.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                              dimension_numbers=DN)
    ref = _grads(lax.conv_general_dilated, x, w, stride, pad, ct)
    np.testing.assert_array_equal(np.asarray(y_ours), np.asarray(y))  # the forward is the same op
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(ref[0]))  # so is the input gradient
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(np.asarray(ours[1]), np.asarray(ref[1]), rtol=tol, atol=tol * np.abs(ref[1]).max())
    assert ours[1].dtype == w.dtype


def test_modes_and_fallbacks():
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 4, 4))
  with pytest.raises(ValueError, match="must be one of"):
    with conv_grad.conv_kernel_grad("fast"):
      pass
  # grouped convs and dilation go to lax as they are; 'SAME'/'VALID' padding: same values and gradient
  for kw in (dict(feature_group_count=2, rhs=jnp.ones((3, 3, 2, 4))), dict(rhs_dilation=(2, 2)),
             dict(padding="SAME"), dict(padding="VALID")):
    rhs = kw.pop("rhs", w)
    padding = kw.pop("padding", ((1, 1), (1, 1)))
    with conv_grad.conv_kernel_grad("taps"):
      got = jax.grad(lambda r: conv_grad.conv_general_dilated(x, r, (1, 1), padding, dimension_numbers=DN,
                                                              **kw).sum())(rhs)
    ref = jax.grad(lambda r: lax.conv_general_dilated(x, r, (1, 1), padding, dimension_numbers=DN, **kw).sum())(rhs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)
  # the mode is read at trace time: the jaxpr has a custom_vjp only in 'taps'/'auto'-on-CPU mode
  # (a new function per trace: JAX caches traces by function)
  f = lambda: lambda r: conv_grad.conv_general_dilated(x, r, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN).sum()
  with conv_grad.conv_kernel_grad("taps"):
    assert "custom_vjp" in str(jax.make_jaxpr(f())(w))
  with conv_grad.conv_kernel_grad("xla"):
    assert "custom_vjp" not in str(jax.make_jaxpr(f())(w))
  # 'auto': wide convs over many positions on CPU; small ones keep XLA's kernel gradient
  g = lambda x_: lambda r: conv_grad.conv_general_dilated(x_, r, (1, 1), "SAME", dimension_numbers=DN).sum()
  cpu = jax.default_backend() == "cpu"
  with conv_grad.conv_kernel_grad("auto"):
    assert "custom_vjp" not in str(jax.make_jaxpr(f())(w))
    assert "custom_vjp" not in str(jax.make_jaxpr(g(x))(jnp.ones((1, 1, 4, 4))))
    big = jax.ShapeDtypeStruct((1, 100, 100, 64), jnp.float32)
    assert ("custom_vjp" in str(jax.make_jaxpr(g(big))(jax.ShapeDtypeStruct((3, 3, 64, 8), jnp.float32)))) == cpu
    small = jax.ShapeDtypeStruct((1, 10, 10, 64), jnp.float32)
    assert "custom_vjp" not in str(jax.make_jaxpr(g(small))(jax.ShapeDtypeStruct((3, 3, 64, 8), jnp.float32)))


def test_flax_conv_takes_it():
  """``nn.Conv(conv_general_dilated=...)`` (as in ConvBN) gives the plain conv's values and parameter gradient."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
  ours = nn.Conv(6, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                 conv_general_dilated=conv_grad.conv_general_dilated)
  plain = nn.Conv(6, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False)
  v = plain.init(jax.random.key(0), x)
  loss = lambda m: lambda p: (m.apply(p, x) ** 2).sum()
  with conv_grad.conv_kernel_grad("taps"):
    g_ours = jax.grad(loss(ours))(v)
  g_plain = jax.grad(loss(plain))(v)
  np.testing.assert_allclose(np.asarray(g_ours["params"]["kernel"]), np.asarray(g_plain["params"]["kernel"]),
                             rtol=2e-5, atol=1e-5)
