"""Deformable convolution v1 (Dai et al. 2017) in pure JAX — the head's "feature adaption" (spec §4).

Semantics follow the official CUDA im2col kernel (``utils/DCN``) exactly:

* input channels split into ``groups`` contiguous deformable groups;
* offset channel ``2·(K·g + k)`` is dy and ``2·(K·g + k) + 1`` is dx for
  deformable group g and kernel tap k = kw·i + j (row-major), K = kh·kw;
* the sample point of output (y, x), tap (i, j) is
  (y − pad + i·dil + dy, x − pad + j·dil + dx) in input pixels;
* bilinear interpolation where every corner outside the image reads 0 (so a
  sample is 0 unless −1 < h < H and −1 < w < W);
* the result is the im2col matmul with the (kh, kw, C_in, C_out) kernel, + bias.

Formulation: the four bilinear corners are gathered with ``take_along_axis``
from the flattened (B, H·W, G, C/G) input — one gather per corner, vectorised
over batch, pixels, taps and groups — weighted (zero outside) and summed, then
contracted with the kernel by one ``einsum``. No Python loops over pixels; it
runs unchanged on CPU, GPU and TPU and is differentiable w.r.t. input, offsets
(through the bilinear weights) and kernel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asff_jax.models.layers import torch_default_init


def deform_conv2d(x, offset, kernel, bias=None, *, groups: int, padding: int = 1,
                  dilation: int = 1, precision=None):
  """Stride-1 deformable convolution (DCNv1, no modulation).

  Args:
    x: ``(B, H, W, C)`` input features.
    offset: ``(B, H, W, 2·groups·kh·kw)`` offsets in input pixels, channel
      layout as the official kernel (see module docstring).
    kernel: ``(kh, kw, C, C_out)``.
    bias: ``(C_out,)`` or None.
    groups: number of deformable groups; must divide C.
    padding: symmetric zero padding (the output keeps H×W when
      ``2·padding == dilation·(k − 1)``).
    dilation: kernel dilation.
    precision: passed to the final einsum.

  Returns:
    ``(B, H, W, C_out)`` in ``x``'s dtype (sampling weights and the matmul
    accumulation are float32, also for bfloat16 inputs).

  Raises:
    ValueError: on inconsistent channel counts.
  """
  b, h, w, c = x.shape
  kh, kw, c_in, c_out = kernel.shape
  k = kh * kw
  if c_in != c or c % groups:
    raise ValueError(f"deform_conv2d: input has {c} channels, kernel expects {c_in}, groups={groups}")
  if offset.shape != (b, h, w, 2 * groups * k):
    raise ValueError(f"deform_conv2d: offset shape {offset.shape} != {(b, h, w, 2 * groups * k)}")
  cg = c // groups
  # Sampling and accumulation precision: at least float32 (float64 under x64).
  acc = jnp.promote_types(jnp.promote_types(offset.dtype, x.dtype), jnp.float32)

  off = offset.astype(acc).reshape(b, h, w, groups, k, 2)
  tap_i = (jnp.arange(k) // kw).astype(acc) * dilation - padding
  tap_j = (jnp.arange(k) % kw).astype(acc) * dilation - padding
  py = jnp.arange(h, dtype=acc)[None, :, None, None, None] + tap_i + off[..., 0]
  px = jnp.arange(w, dtype=acc)[None, None, :, None, None] + tap_j + off[..., 1]
  # Order the sample axis (pixel, tap) so the result reshapes to im2col columns.
  py = jnp.transpose(py, (0, 1, 2, 4, 3)).reshape(b, h * w * k, groups)
  px = jnp.transpose(px, (0, 1, 2, 4, 3)).reshape(b, h * w * k, groups)
  y0 = jnp.floor(py)
  x0 = jnp.floor(px)
  ly, lx = py - y0, px - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)

  src = x.reshape(b, h * w, groups, cg)
  cols = jnp.zeros((b, h * w * k, groups, cg), acc)
  for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
    yy, xx = y0 + dy, x0 + dx
    wgt = (ly if dy else 1.0 - ly) * (lx if dx else 1.0 - lx)
    valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
    vals = jnp.take_along_axis(src, idx[..., None], axis=1, mode="clip")
    cols = cols + vals.astype(acc) * jnp.where(valid, wgt, 0.0)[..., None]
  cols = cols.astype(x.dtype).reshape(b, h, w, k * c)
  out = jnp.einsum("bhwk,ko->bhwo", cols, kernel.reshape(k * c, c_out).astype(x.dtype),
                   precision=precision, preferred_element_type=acc)
  if bias is not None:
    out = out + bias.astype(acc)
  return out.astype(x.dtype)


class DeformConv(nn.Module):
  """Flax wrapper of :func:`deform_conv2d` (official ``DeformConv2d``: 3×3, pad 1, with bias).

  Params: ``kernel`` (kh, kw, C, features), ``bias`` (features,), initialised
  as PyTorch's default (kaiming_uniform(a=√5), U(±1/√fan_in)), which the
  official ``init_yolo`` leaves untouched (spec §7).
  """

  features: int
  kernel_size: int = 3
  groups: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, offset):
    c = x.shape[-1]
    ks = self.kernel_size
    kernel = self.param("kernel", torch_default_init, (ks, ks, c, self.features), jnp.float32)
    fan_in = c * ks * ks
    bound = 1.0 / jnp.sqrt(fan_in)
    bias = self.param("bias", lambda key, s: jax.random.uniform(key, s, jnp.float32, -bound, bound),
                      (self.features,))
    return deform_conv2d(x.astype(self.dtype), offset, kernel.astype(self.dtype), bias,
                         groups=self.groups, padding=(ks - 1) // 2)
