"""The official strong-baseline neck: SPP, top-down path, DropBlock positions (spec §2, layers 11–32).

Produces the three fusion inputs, coarsest first (the official "level 0" is
stride 32): ``P5`` (512 ch, /32), ``P4`` (256 ch, /16), ``P3`` (256 ch, /8).
Submodule ``layer_{i}`` is the ASFF model's ``module_list.{i}``; the baseline
model numbers the same layers differently (see :mod:`asff_jax.models.official_weights`).

Concat order is always [upsampled top-down feature, backbone skip]. DropBlock
sits after layers 15, 21 and 28 (official indices 16, 22, 29).

The MobileNetV2 models (``yolov3_mobilev2.py``) build the same neck on the
MobileNetV2 routes (C5 1280, C4 96, C3 32 channels) with ReLU6 in place of
LeakyReLU and without the last 3×3 conv (layer 32): their ``P3`` is the
128-channel layer-31 output. Their official indices are ours + 8 (``module_list.19–39``,
the upsamples counted as layers 27 and 34).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from asff_jax.models.layers import ConvBN, DropBlock, ResBlock, scaled_channels, spp, upsample_nearest


class YoloNeck(nn.Module):
  """YOLOv3 + SPP neck as in the official ``build_yolov3_modules``.

  Call with ``(c3, c4, c5)`` from :class:`~asff_jax.models.darknet.Darknet53`
  and an optional ``dropblock`` = sequence of three ``(block_size, keep_prob)``
  (one per DropBlock position, coarsest first) used only when ``train``.

  Returns ``(P5, P4, P3)``: ``(B, H/32, W/32, 512w)``, ``(B, H/16, W/16, 256w)``,
  ``(B, H/8, W/8, 256w)`` (128w without ``last_conv``).

  Attributes:
    width, dtype: channel multiplier, compute dtype.
    act: ``'leaky'`` (Darknet models) or ``'relu6'`` (MobileNetV2 models).
    last_conv: the final 3×3 conv to 256 channels (layer 32; False for MobileNetV2).
  """

  width: float = 1.0
  dtype: Any = jnp.float32
  act: str = "leaky"
  last_conv: bool = True

  @nn.compact
  def __call__(self, feats, train: bool, dropblock=None):
    c3, c4, c5 = feats
    ch = lambda c: scaled_channels(c, self.width)
    conv = lambda f, k, i: ConvBN(ch(f), k, dtype=self.dtype, act=self.act, name=f"layer_{i}")
    res = lambda c, i: ResBlock(ch(c), 1, shortcut=False, dtype=self.dtype, act=self.act, name=f"layer_{i}")
    db = (lambda j: None) if dropblock is None else (lambda j: dropblock[j])

    # Level 0 (stride 32).
    x = res(1024, 11)(c5, train)
    x = conv(512, 1, 12)(x, train)
    x = spp(x)  # layer 13
    x = conv(512, 1, 14)(x, train)
    x = conv(1024, 3, 15)(x, train)
    x = DropBlock(name="dropblock_16")(x, train, db(0))
    p5 = conv(512, 1, 17)(x, train)

    # Level 1 (stride 16).
    x = conv(256, 1, 18)(p5, train)
    x = jnp.concatenate([upsample_nearest(x, 2), c4.astype(x.dtype)], axis=-1)  # layer 19
    x = conv(256, 1, 20)(x, train)
    x = conv(512, 3, 21)(x, train)
    x = DropBlock(name="dropblock_22")(x, train, db(1))
    x = res(512, 23)(x, train)
    p4 = conv(256, 1, 24)(x, train)

    # Level 2 (stride 8).
    x = conv(128, 1, 25)(p4, train)
    x = jnp.concatenate([upsample_nearest(x, 2), c3.astype(x.dtype)], axis=-1)  # layer 26
    x = conv(128, 1, 27)(x, train)
    x = conv(256, 3, 28)(x, train)
    x = DropBlock(name="dropblock_29")(x, train, db(2))
    x = res(256, 30)(x, train)
    x = conv(128, 1, 31)(x, train)
    p3 = conv(256, 3, 32)(x, train) if self.last_conv else x
    return p5, p4, p3
