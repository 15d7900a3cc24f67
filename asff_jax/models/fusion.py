"""Feature fusion: ASFF (paper §3.2, Eq. 1–2; official spec §3) and the Table 3 alternatives.

Every fusion module for level ``l`` takes the three neck outputs
``(x0, x1, x2) = (P5 /32, P4 /16, P3 /8)`` (level 0 is the coarsest, as in the
official code; the paper's ASFF-1 is our level 0) and returns a dict with
``'out'``: the head input at level l, ``(B, H_l, W_l, [1024, 512, 256][l]·w)``.

Resizing to level l, x^{n→l} (official ``ASFF`` module, shared by
``'asff'``, ``'sum'`` and ``'concat'``):

* l = 0: x^{0→0} = x0; x^{1→0} = 3×3 s2 conv(x1); x^{2→0} = 3×3 s2 conv(maxpool 3 s2 (x2)).
* l = 1: x^{0→1} = up×2(1×1 conv(x0)); x^{1→1} = x1; x^{2→1} = 3×3 s2 conv(x2).
* l = 2: x^{0→2} = up×4(1×1 conv(x0)); x^{1→2} = up×2(x1) — no compress conv
  (official; the paper describes one before every upsampling); x^{2→2} = x2.

Fusion variants (``config.model.fusion``):

* ``'asff'`` (Eq. 1–2): y^l = α^l·x^{0→l} + β^l·x^{1→l} + γ^l·x^{2→l}, with
  [α, β, γ] = softmax over levels of a 1×1 conv (with bias) applied to the
  concat of three 1×1 conv-BN-leaky "weight" convs (``compress_c`` channels
  each: 16, or 8 with RFB). Then ``expand`` (3×3 conv-BN-leaky). Also returns
  ``'weights'`` (B, H, W, 3) = (α, β, γ) and ``'fused_sum'`` (B, H, W), the
  fused map summed over channels (the official ``vis`` outputs).
* ``'sum'``: y^l = x^{0→l} + x^{1→l} + x^{2→l}, then ``expand``. Our choice
  (the paper leaves it open): unweighted element-wise sum of the same resized
  features — i.e. ASFF with α = β = γ = 1.
* ``'concat'``: y^l = 1×1 conv-BN-leaky(concat[x^{0→l}, x^{1→l}, x^{2→l}])
  from 3·inter to inter channels (submodule ``fuse``), then ``expand``. Our
  choice: one 1×1 conv, the cheapest learned mixing that keeps the head input
  width the same as ASFF's.
* ``'none'``: the official strong baseline — per level a 3×3 conv-BN-leaky on
  its own feature (512→1024 at level 0, 256→512 at level 1) and the identity at
  level 2 (its 3×3 conv is the neck's last layer), no cross-level fusion.

MobileNetV2 models (the official ``ASFFmobile`` and the mobile baseline's
``level_l_conv``): ``inter`` = (512, 256, 128), every conv-BN with ReLU6
(``act``), and a neck without its last conv, so the 128-channel level-2 input
is resized like the others: at level 2, x^{1→2} passes ``compress_level_1``
(1×1 256→128) before the ×2 upsample, and ``'none'`` has a 3×3 conv 128→256
at level 2 too.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from asff_jax.models.conv_grad import conv_general_dilated as tap_grad_conv
from asff_jax.models.layers import ConvBN, conv_init, scaled_channels, upsample_nearest

FUSIONS = ("asff", "sum", "concat", "none")
DARKNET_INTER = (512, 256, 256)
MOBILE_INTER = (512, 256, 128)
_OUT = (1024, 512, 256)


class LevelResize(nn.Module):
  """Resizes the three neck outputs to level ``level``: returns [x^{0→l}, x^{1→l}, x^{2→l}].

  Each ``(B, H_l, W_l, inter_l)`` with inter = ``inter[l]``·width ((512, 256,
  256) for Darknet, (512, 256, 128) for MobileNetV2). Submodule names are the
  official ones (``stride_level_1``, ``stride_level_2``, ``compress_level_0``,
  and ``compress_level_1`` where x^1 is wider than level 2: MobileNetV2).
  """

  level: int
  width: float = 1.0
  dtype: Any = jnp.float32
  inter: Sequence[int] = DARKNET_INTER
  act: str = "leaky"

  @nn.compact
  def __call__(self, xs, train: bool):
    x0, x1, x2 = xs
    inter = scaled_channels(self.inter[self.level], self.width)
    conv = lambda k, s, name: ConvBN(inter, k, stride=s, dtype=self.dtype, act=self.act, name=name)
    if self.level == 0:
      r0 = x0
      r1 = conv(3, 2, "stride_level_1")(x1, train)
      r2 = nn.max_pool(x2, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
      r2 = conv(3, 2, "stride_level_2")(r2, train)
    elif self.level == 1:
      r0 = upsample_nearest(conv(1, 1, "compress_level_0")(x0, train), 2)
      r1 = x1
      r2 = conv(3, 2, "stride_level_2")(x2, train)
    elif self.level == 2:
      r0 = upsample_nearest(conv(1, 1, "compress_level_0")(x0, train), 4)
      if x1.shape[-1] != inter:
        x1 = conv(1, 1, "compress_level_1")(x1, train)
      r1 = upsample_nearest(x1, 2)
      r2 = x2
    else:
      raise ValueError(f"level must be 0, 1 or 2, got {self.level}")
    return [r0, r1, r2]


def asff_weights(weight_logits):
  """Softmax over levels (paper Eq. 2): ``(B, H, W, 3)`` logits → (α, β, γ), summing to 1."""
  return jax.nn.softmax(weight_logits.astype(jnp.float32), axis=-1)


class LevelFusion(nn.Module):
  """Fusion module for one level; ``kind`` in ``FUSIONS`` (see module docstring).

  Attributes:
    level: 0 (stride 32), 1 (stride 16) or 2 (stride 8).
    kind: ``'asff' | 'sum' | 'concat' | 'none'``.
    compress_c: channels of each ASFF weight conv (official 16; 8 with RFB).
    width: channel multiplier.
    dtype: compute dtype.
    inter: the resized width per level (``DARKNET_INTER``; ``MOBILE_INTER`` for ``ASFFmobile``).
    act: ``'leaky'`` (Darknet) or ``'relu6'`` (MobileNetV2) after every conv-BN.

  Call with ``xs = (P5, P4, P3)``; returns a dict with ``'out'`` and, for
  ``'asff'``, ``'weights'`` (B, H, W, 3) float32 and ``'fused_sum'`` (B, H, W).
  """

  level: int
  kind: str = "asff"
  compress_c: int = 16
  width: float = 1.0
  dtype: Any = jnp.float32
  inter: Sequence[int] = DARKNET_INTER
  act: str = "leaky"

  @nn.compact
  def __call__(self, xs, train: bool):
    out_c = scaled_channels(_OUT[self.level], self.width)
    if self.kind == "none":
      x = xs[self.level]
      if x.shape[-1] != out_c:  # Darknet level 2: the neck's last conv already is this 3x3 conv
        x = ConvBN(out_c, 3, dtype=self.dtype, act=self.act, name="conv")(x, train)
      return {"out": x}
    if self.kind not in FUSIONS:
      raise ValueError(f"unknown fusion {self.kind!r}; expected one of {FUSIONS}")

    resized = LevelResize(self.level, self.width, self.dtype, self.inter, self.act, name="resize")(xs, train)
    result = {}
    if self.kind == "asff":
      logits = [
          ConvBN(self.compress_c, 1, dtype=self.dtype, act=self.act, name=f"weight_level_{n}")(r, train)
          for n, r in enumerate(resized)
      ]
      logits = nn.Conv(3, (1, 1), use_bias=True, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=conv_init, conv_general_dilated=tap_grad_conv,
                       name="weight_levels")(jnp.concatenate(logits, -1))
      w = asff_weights(logits)
      wc = w.astype(self.dtype)
      fused = resized[0] * wc[..., 0:1] + resized[1] * wc[..., 1:2] + resized[2] * wc[..., 2:3]
      result["weights"] = w
      result["fused_sum"] = jnp.sum(fused.astype(jnp.float32), axis=-1)
    elif self.kind == "sum":
      fused = resized[0] + resized[1] + resized[2]
    else:  # concat
      inter = resized[0].shape[-1]
      fused = ConvBN(inter, 1, dtype=self.dtype, act=self.act, name="fuse")(jnp.concatenate(resized, -1), train)
    result["out"] = ConvBN(out_c, 3, dtype=self.dtype, act=self.act, name="expand")(fused, train)
    return result
