"""A drop-in ``lax.conv_general_dilated`` whose kernel gradient is computed as matmuls, one per tap.

The forward is ``lax.conv_general_dilated`` unchanged, and so is the input
gradient (JAX's own transpose of the conv). Only the kernel gradient of a
``k × k`` conv (stride s, symmetric padding p, NHWC input, HWIO kernel, no
groups or dilation) is written differently:

    ∂L/∂W[i, j, c, o] = Σ_{b, y, x} x_pad[b, s·y + i, s·x + j, c] · g[b, y, x, o]

i.e. for each tap (i, j) one matmul ``(B·H_out·W_out, C_in)ᵀ @ (B·H_out·W_out,
C_out)`` of a strided slice of the padded input with the output gradient. XLA:CPU
turns those into its fast GEMM, where its own convolution-backprop-filter runs at
a fraction of the matmul peak (issue 18's profile; ``experiments/benchmarks.md``).
The values are the same sums in another order (equal to float32 rounding; a
test checks against ``jax.grad`` of the plain conv, in float64 too).

Which implementation a traced conv uses is chosen at trace time by
:func:`conv_kernel_grad` (a context manager, like
:func:`~asff_jax.models.layers.frozen_batch_norm`): ``'auto'`` (default) uses
the per-tap matmuls on the CPU backend for the conv shapes where they were
measured faster (≥ 64 input channels over ≥ 10,000 output positions
B·H_out·W_out) and XLA's own kernel gradient elsewhere and on GPU/TPU (not
measured there); ``'taps'`` and ``'xla'`` force one for every
eligible conv. The mode is read when the function is traced: set it around the
code that traces (JAX caches traces per function, so a jitted function keeps
the mode of its first trace). ``nn.Conv`` takes the
function through its ``conv_general_dilated`` field (:class:`~asff_jax.models.layers.ConvBN`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

MODES = ("auto", "taps", "xla")
_MODE: contextvars.ContextVar = contextvars.ContextVar("asff_jax_conv_kernel_grad", default="auto")
_NHWC = ("NHWC", "HWIO", "NHWC")


@contextlib.contextmanager
def conv_kernel_grad(mode: str):
  """Within this context, convs traced through :func:`conv_general_dilated` use ``mode``'s kernel gradient.

  Args:
    mode: ``'auto'`` (per-tap matmuls on CPU where measured faster, XLA elsewhere), ``'taps'`` or ``'xla'``.

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f"conv kernel-gradient mode must be one of {MODES}, got {mode!r}")
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


# 'auto' on CPU: where the per-tap matmuls beat XLA:CPU's kernel gradient (measured per conv shape of the
# full-size Darknet at 416, batch 4; experiments/benchmarks.md): convs with at least TAPS_MIN_CHANNELS
# input channels over at least TAPS_MIN_ROWS output positions (B * H_out * W_out). Below that (the 3->32
# stem, 32->64 at 208 px, the 13 and 26 px convs) XLA's own is as fast or faster, and the reduced-width
# models of the digits configs (no gain measured: benchmarks.md) keep XLA's arithmetic exactly.
TAPS_MIN_CHANNELS = 64
TAPS_MIN_ROWS = 10_000


def _use_taps(x_shape, w_shape, strides) -> bool:
  mode = _MODE.get()
  if mode != "auto":
    return mode == "taps"
  if jax.default_backend() != "cpu":
    return False
  if not all(isinstance(d, int) for d in (*x_shape, *w_shape)):  # symbolic shapes (jax.export): XLA's
    return False
  c_in = w_shape[2]
  rows = x_shape[0] * -(-x_shape[1] // strides[0]) * -(-x_shape[2] // strides[1])
  return c_in >= TAPS_MIN_CHANNELS and rows >= TAPS_MIN_ROWS


def _conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_taps(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision)


def _conv_taps_fwd(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def kernel_grad_by_taps(x, g, kernel_hw, strides, padding):
  """∂L/∂W of an NHWC/HWIO conv from its input and output gradient, one matmul per tap.

  Args:
    x: input ``(B, H, W, C_in)``.
    g: output gradient ``(B, H_out, W_out, C_out)``.
    kernel_hw: ``(k_h, k_w)``.
    strides: ``(s_h, s_w)``.
    padding: ``((top, bottom), (left, right))`` in input pixels.

  Returns:
    ``(k_h, k_w, C_in, C_out)``, accumulated and returned in float32 (float64 for float64 inputs).
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  b, ho, wo, co = g.shape
  ci = x.shape[-1]
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  gm = g.reshape(b * ho * wo, co)
  acc = jnp.promote_types(jnp.promote_types(x.dtype, g.dtype), jnp.float32)
  rows = []
  for i in range(kh):
    taps = []
    for j in range(kw):
      xs = lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, ci), (1, sh, sw, 1))
      taps.append(jnp.matmul(xs.reshape(b * ho * wo, ci).T, gm, preferred_element_type=acc))
    rows.append(jnp.stack(taps))
  return jnp.stack(rows)


def _conv_taps_bwd(strides, padding, precision, res, g):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, padding, precision), x)
  (dx,) = vjp_x(g)
  dw = kernel_grad_by_taps(x, g, w.shape[:2], strides, padding).astype(w.dtype)
  return dx, dw


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """``lax.conv_general_dilated`` (same signature and values); the kernel gradient per :func:`conv_kernel_grad`.

  Convs outside the per-tap case (groups, dilation, another layout, a
  preferred element type) and every conv in ``'xla'`` mode go to
  ``lax.conv_general_dilated`` as they are.
  """
  plain = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                            precision=precision, preferred_element_type=preferred_element_type)
  if lhs.ndim != 4:
    return plain()
  ones = (None, (1, 1), [1, 1])
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if (feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None
      or lhs_dilation not in ones or rhs_dilation not in ones
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc):
    return plain()
  strides = tuple(int(s) for s in window_strides)
  if not _use_taps(lhs.shape, rhs.shape, strides):
    return plain()
  if isinstance(padding, str):  # 'SAME' / 'VALID' as explicit pads (lax's own rule)
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv_taps(lhs, rhs, strides, pads, precision)
