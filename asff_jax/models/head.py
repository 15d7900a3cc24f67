"""Guided-anchor YOLOv3 head with deformable feature adaption and an anchor-free slot (spec §4).

Per level, 4 slots per cell: slots 0–2 use the level's three prior anchors (in
mask order), slot 3 is anchor-free with base size 4·stride. Layers:

1. ``guide_wh``: 1×1 conv (bias) C → 8: raw log-scales g; channel 2a is
   log-w and 2a+1 log-h of slot a. Predicted anchors pw = exp(g_w)·A_w,
   ph = exp(g_h)·A_h.
2. ``feature_adaption`` (official ``Feature_adaption``): optional RFB (ASFF*),
   then ``conv_offset`` — a grouped (4 groups) 1×1 conv 8 → 72 with bias on
   ``stop_gradient(g)`` — and ``dconv``, a 3×3 deformable conv (4 deformable
   groups, bias), no activation.
3. ``conv``: 1×1 conv (bias) C → 4·(5 + num_classes); channel
   (5 + num_classes)·slot + c with c: tx, ty, tw, th, objectness, classes.

The MobileNetV2 models build their heads with the official ``sep=True``:
no feature adaption (no ``conv_offset``, no deformable conv; ``conv`` reads
the head input directly), ``guide_wh`` unchanged (``adaption=False`` here).

Decoding (:func:`decode_level`, grid units; :func:`pred_rows`, the official
``pred`` rows in input pixels): cx = σ(tx) + x, cy = σ(ty) + y, w = exp(tw)·pw,
h = exp(th)·ph; objectness and class probabilities by independent sigmoids.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.models.conv_grad import conv_general_dilated as tap_grad_conv
from asff_jax.models.dcn import DeformConv
from asff_jax.models.layers import RFBBlock, conv_init

NUM_SLOTS = 4
DEFORM_GROUPS = 4


class FeatureAdaption(nn.Module):
  """RFB (optional) + deformable 3×3 conv driven by offsets from the wh prediction.

  Call with head input ``(B, H, W, C)`` and raw ``guide_wh`` ``(B, H, W, 8)``;
  returns a dict with ``'adapted'`` ``(B, H, W, C)``, ``'offset'``
  ``(B, H, W, 72)`` and, with RFB, ``'rfb'`` ``(B, H, W, C)``.
  """

  rfb: bool = False
  dtype: Any = jnp.float32
  dcn_formulation: str = "corners"

  @nn.compact
  def __call__(self, x, guide_wh):
    c = x.shape[-1]
    out = {}
    offset = nn.Conv(2 * DEFORM_GROUPS * 9, (1, 1), feature_group_count=DEFORM_GROUPS,
                     use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=conv_init, name="conv_offset")(
                         jax.lax.stop_gradient(guide_wh.astype(jnp.float32)))
    if self.rfb:
      x = RFBBlock(dtype=self.dtype, name="rfb")(x)
      out["rfb"] = x
    out["offset"] = offset
    out["adapted"] = DeformConv(c, 3, DEFORM_GROUPS, dtype=self.dtype,
                                formulation=self.dcn_formulation, name="dconv")(x, offset)
    return out


class GuidedAnchorHead(nn.Module):
  """Head for one level; see the module docstring.

  Attributes:
    num_classes: number of classes C.
    rfb: apply the RFB block before the DCN (ASFF*).
    dtype: compute dtype (outputs ``raw`` and ``guide_wh`` are float32).
    dcn_formulation: ``'corners'`` or ``'patches'`` (:func:`~asff_jax.models.dcn.deform_conv2d`).
    adaption: the deformable feature adaption (False: the official ``sep=True``
      head of the MobileNetV2 models; ``'adapted'`` is then the input, no ``'offset'``).

  Call with ``(B, H, W, C_in)``; returns a dict with ``'raw'``
  ``(B, H, W, 4·(5 + C))``, ``'guide_wh'`` ``(B, H, W, 8)``, ``'offset'``,
  ``'adapted'`` (and ``'rfb'``).
  """

  num_classes: int
  rfb: bool = False
  dtype: Any = jnp.float32
  dcn_formulation: str = "corners"
  adaption: bool = True

  @nn.compact
  def __call__(self, x):
    guide_wh = nn.Conv(2 * NUM_SLOTS, (1, 1), use_bias=True, dtype=self.dtype,
                       param_dtype=jnp.float32, kernel_init=conv_init,
                       conv_general_dilated=tap_grad_conv, name="guide_wh")(x)
    guide_wh = guide_wh.astype(jnp.float32)
    if self.adaption:
      out = FeatureAdaption(rfb=self.rfb, dtype=self.dtype, dcn_formulation=self.dcn_formulation,
                            name="feature_adaption")(x, guide_wh)
    else:  # the official sep=True head (MobileNetV2 models)
      out = {"adapted": x}
    raw = nn.Conv(NUM_SLOTS * (5 + self.num_classes), (1, 1), use_bias=True, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=conv_init,
                  conv_general_dilated=tap_grad_conv, name="conv")(out["adapted"])
    out["raw"] = raw.astype(jnp.float32)
    out["guide_wh"] = guide_wh
    return out


def level_anchor_bases(anchors, mask, stride: int) -> np.ndarray:
  """Base (w, h) per slot at one level: the 3 masked prior anchors, then (4·stride, 4·stride).

  Returns a ``(4, 2)`` float32 array in input pixels.
  """
  base = [tuple(anchors[m]) for m in mask] + [(4.0 * stride, 4.0 * stride)]
  return np.asarray(base, np.float32)


def decode_level(raw, guide_wh, *, stride: int, anchor_bases):
  """Splits and decodes one level's head outputs in grid units (spec §4 "Predicted anchors", "Decoding").

  Args:
    raw: ``(B, H, W, 4·(5 + C))`` prediction-conv output, channel ``(5 + C)·slot + c``.
    guide_wh: ``(B, H, W, 8)`` raw log-scales (channel ``2a`` log-w, ``2a + 1`` log-h).
    stride: the level's stride in input pixels.
    anchor_bases: ``(4, 2)`` base (w, h) per slot in input pixels (:func:`level_anchor_bases`).

  Returns:
    dict with ``'out'`` ``(B, H, W, 4, 5 + C)`` (raw, split per slot),
    ``'anchor_wh'`` ``(B, H, W, 4, 2)`` predicted (guided) anchors
    ``exp(g)·A / stride``, ``'box'`` ``(B, H, W, 4, 4)`` decoded ``[cx, cy, w, h]``
    (``cx = σ(tx) + x``, ``w = exp(tw)·pw``), all in grid units, and ``'stride'``.

  Raises:
    ValueError: channel count not ``4·(5 + C)`` with C ≥ 1, or ``guide_wh`` not 8 channels.
  """
  b, h, w, ch = raw.shape
  if ch % NUM_SLOTS or ch // NUM_SLOTS < 6:
    raise ValueError(f"raw must have 4*(5+C) channels, got {ch}")
  if guide_wh.shape != (b, h, w, 2 * NUM_SLOTS):
    raise ValueError(f"guide_wh must be {(b, h, w, 2 * NUM_SLOTS)}, got {guide_wh.shape}")
  out = raw.reshape(b, h, w, NUM_SLOTS, ch // NUM_SLOTS)
  g = guide_wh.reshape(b, h, w, NUM_SLOTS, 2)
  anchor_wh = jnp.exp(g) * jnp.asarray(np.asarray(anchor_bases, np.float32) / stride)
  gx = jnp.arange(w, dtype=raw.dtype)[None, None, :, None]
  gy = jnp.arange(h, dtype=raw.dtype)[None, :, None, None]
  cx = jax.nn.sigmoid(out[..., 0]) + gx
  cy = jax.nn.sigmoid(out[..., 1]) + gy
  wh = jnp.exp(out[..., 2:4]) * anchor_wh
  box = jnp.concatenate([cx[..., None], cy[..., None], wh], -1)
  return dict(out=out, anchor_wh=anchor_wh, box=box, stride=stride)


def pred_rows(decoded):
  """The official ``pred`` rows of one level from :func:`decode_level` (eval mode).

  Returns:
    ``(B, 4·H·W, 5 + C)`` float32 rows ordered slot-major, then y, then x; columns
    cx, cy, w, h (input pixels), objectness probability, class probabilities.
  """
  out, box, stride = decoded["out"], decoded["box"], decoded["stride"]
  b, h, w, s, n = out.shape
  rows = jnp.concatenate([box.astype(jnp.float32) * stride,
                          jax.nn.sigmoid(out[..., 4:].astype(jnp.float32))], axis=-1)
  return jnp.transpose(rows, (0, 3, 1, 2, 4)).reshape(b, s * h * w, n)
