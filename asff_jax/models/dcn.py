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

Formulations (same values, tested; :class:`DeformConv` uses ``'corners'`` by
default, the faster one in the full-width model on this CPU, see
``experiments/benchmarks.md``; ``model.dcn_formulation`` selects one):

* ``'corners'``: the four bilinear corners are gathered with
  ``take_along_axis`` from the flattened (B, H·W, G, C/G) input — one gather
  per corner, vectorised over batch, pixels, taps and groups — weighted (zero
  outside) and summed;
* ``'patches'``: the input is zero-padded by one pixel and rearranged once into
  2×2 neighbourhoods (B, (H+1)·(W+1), G, 4, C/G), so each sample's four corners
  are one gather row of 4·C/G contiguous values — one gather, and in the
  backward pass one scatter-add, per sample instead of four.

Either way the columns are then contracted with the kernel by one ``einsum``. No Python loops over pixels; it
runs unchanged on CPU, GPU and TPU and is differentiable w.r.t. input, offsets
(through the bilinear weights) and kernel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from asff_jax.models.layers import torch_default_init


FORMULATIONS = ("corners", "patches")


def deform_conv2d(x, offset, kernel, bias=None, *, groups: int, padding: int = 1,
                  dilation: int = 1, precision=None, formulation: str = "corners"):
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
    formulation: ``'corners'`` (four gathers, one per bilinear corner) or
      ``'patches'`` (one gather of 2×2 neighbourhoods). Same values to float
      rounding (tested). On this CPU ``'patches'`` is 2.4× faster for the
      three heads' DCN alone (forward + backward, batch 1) but 25 % slower
      forward, and 13 % slower in the full batch-4 training step.

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
  if formulation not in FORMULATIONS:
    raise ValueError(f"deform_conv2d: formulation must be one of {FORMULATIONS}, got {formulation!r}")
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

  if formulation == "corners":
    src = x.reshape(b, h * w, groups, cg)
    cols = jnp.zeros((b, h * w * k, groups, cg), acc)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
      yy, xx = y0 + dy, x0 + dx
      wgt = (ly if dy else 1.0 - ly) * (lx if dx else 1.0 - lx)
      valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
      vals = jnp.take_along_axis(src, idx[..., None], axis=1, mode="clip")
      cols = cols + vals.astype(acc) * jnp.where(valid, wgt, 0.0)[..., None]
  else:
    # One gather per sample instead of four: x4[y, x] holds the 2x2 neighbourhood whose top-left
    # corner is padded pixel (y, x) (zero padding = corners outside the image read 0), so a sample
    # with top-left corner (y0, x0) reads row (y0 + 1, x0 + 1) of x4: 4·C/G contiguous values.
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    corners = [xp[:, dy:dy + h + 1, dx:dx + w + 1] for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))]
    x4 = jnp.stack([q.reshape(b, h + 1, w + 1, groups, cg) for q in corners], axis=-2)
    src = x4.reshape(b, (h + 1) * (w + 1), groups, 4, cg)
    inside = (y0 >= -1) & (y0 <= h - 1) & (x0 >= -1) & (x0 <= w - 1)
    idx = jnp.clip(y0 + 1, 0, h) * (w + 1) + jnp.clip(x0 + 1, 0, w)
    wgt = jnp.stack([(1.0 - ly) * (1.0 - lx), (1.0 - ly) * lx, ly * (1.0 - lx), ly * lx], axis=-1)
    wgt = jnp.where(inside[..., None], wgt, 0.0)
    vals = jnp.take_along_axis(src, idx[..., None, None], axis=1, mode="clip")  # (B, HWK, G, 4, C/G)
    cols = jnp.einsum("bngqc,bngq->bngc", vals.astype(acc), wgt)
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
  formulation: str = "corners"

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
                         groups=self.groups, padding=(ks - 1) // 2, formulation=self.formulation)
