"""MobileNetV2 backbone returning C3, C4, C5 (official ``models/yolov3_mobilev2.py``; spec §1).

The official MobileNetV2 ``features`` (Sandler et al. 2018; the same as
torchvision's ``mobilenet_v2().features``), as the official detector lists it:
``module_list.{i}`` = submodule ``layer_{i}``. Every conv is conv-BN-ReLU6
except the inverted residuals' 1×1 projections (linear: BN, no activation).

=====  ==============================================  ======  ======
 i     op (t: expansion, s: stride)                     out ch  stride
=====  ==============================================  ======  ======
 0     conv 3×3 s2                                      32      2
 1     inverted residual t=1 (no expand conv)           16      2
 2–3   inverted residual t=6, first s2                  24      4
 4–6   inverted residual t=6, first s2 → C3 (6)         32      8
 7–10  inverted residual t=6, first s2                  64      16
 11–13 inverted residual t=6 → C4 (13)                  96      16
 14–16 inverted residual t=6, first s2                  160     32
 17    inverted residual t=6                            320     32
 18    conv 1×1 → C5                                    1280    32
=====  ==============================================  ======  ======

An inverted residual: ``expand`` 1×1 (t·C_in, ReLU6; absent when t = 1) →
``dw`` 3×3 depthwise at stride s (``feature_group_count`` = channels, ReLU6)
→ ``project`` 1×1 (linear), plus the input when s = 1 and C_in = C_out.
Submodule names ↔ official (:mod:`asff_jax.models.official_names`):
``layer_0/{conv,batch_norm}`` ↔ ``module_list.0.{0,1}`` (and 18);
t = 6: ``expand`` ↔ ``conv.0.{0,1}``, ``dw`` ↔ ``conv.1.{0,1}``, ``project/conv``
↔ ``conv.2``, ``project/batch_norm`` ↔ ``conv.3``; t = 1: ``dw`` ↔ ``conv.0.{0,1}``,
``project`` ↔ ``conv.1`` / ``conv.2``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from asff_jax.models.layers import ConvBN, scaled_channels

#: (t, c, n, s) per stage, the MobileNetV2 paper's Table 2 (the official ``InvertedResidual`` settings).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
#: ``module_list`` indices whose outputs are C3, C4 (C5 is the last, 18).
ROUTES = (6, 13)


class InvertedResidual(nn.Module):
  """MobileNetV2 block (see the module docstring). ``(B, H, W, C_in)`` → ``(B, H/s, W/s, features)``."""

  features: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    hidden = c_in * self.expand_ratio
    h = x
    if self.expand_ratio != 1:
      h = ConvBN(hidden, 1, dtype=self.dtype, act="relu6", name="expand")(h, train)
    h = ConvBN(hidden, 3, stride=self.stride, groups=hidden, dtype=self.dtype, act="relu6", name="dw")(h, train)
    h = ConvBN(self.features, 1, dtype=self.dtype, act="linear", name="project")(h, train)
    return x + h if self.stride == 1 and c_in == self.features else h


class MobileNetV2(nn.Module):
  """MobileNetV2 features (width multiplier ``width`` on every stage; 1.0 = official).

  Input ``(B, H, W, 3)`` with H, W multiples of 32. Returns ``(C3, C4, C5)`` =
  ``(B, H/8, W/8, 32w)``, ``(B, H/16, W/16, 96w)``, ``(B, H/32, W/32, 1280w)``
  and, with ``return_all``, also the list of every ``layer_i`` output (the
  parity fixture's stage arrays).
  """

  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, return_all: bool = False):
    ch = lambda c: scaled_channels(c, self.width)
    x = ConvBN(ch(32), 3, stride=2, dtype=self.dtype, act="relu6", name="layer_0")(x, train)
    outs = [x]
    i = 1
    for t, c, n, s in STAGES:
      for k in range(n):
        x = InvertedResidual(ch(c), s if k == 0 else 1, t, dtype=self.dtype, name=f"layer_{i}")(x, train)
        outs.append(x)
        i += 1
    x = ConvBN(ch(1280), 1, dtype=self.dtype, act="relu6", name=f"layer_{i}")(x, train)
    outs.append(x)
    feats = (outs[ROUTES[0]], outs[ROUTES[1]], x)
    return (feats, outs) if return_all else feats
