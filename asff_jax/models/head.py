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
   With ``class_head='shared'`` (not official) ``conv`` gives only the 4·5
   box/objectness channels and ``conv_cls`` (1×1, bias) C → num_classes one
   set of class logits per cell, copied into every slot's class channels — so
   ``raw`` keeps the official layout, but the four slots (which see the same
   adapted feature) train one classifier instead of four. ``class_head='fused'``
   (not official) is the same but ``conv_cls`` reads the head input (the
   fusion output) instead of the DCN-adapted feature, so the class bypasses the
   deformable adaption (``experiments/class_path_probe.py`` measures how much
   that layer slows class learning from scratch).

Decoding (:func:`decode_level`, eval mode): cx = (σ(tx) + x)·stride,
cy = (σ(ty) + y)·stride, w = exp(tw)·pw, h = exp(th)·ph, objectness and class
probabilities by independent sigmoids.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.models.dcn import DeformConv
from asff_jax.models.layers import RFBBlock, conv_init

NUM_SLOTS = 4
DEFORM_GROUPS = 4
CLASS_HEADS = ("per_slot", "shared", "fused")


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


def objectness_bias_init(num_classes: int, prior: Optional[float]):
  """Bias initialiser of the prediction conv: zeros (official), or objectness logits at ``prior``.

  With ``prior`` = π the objectness channels ``(5 + C)·slot + 4`` start at
  ``log(π / (1 − π))`` so that every cell predicts objectness π instead of
  0.5 (the focal-loss paper's prior init; not in the official code). The
  other channels start at zero.
  """
  if prior is None:
    return nn.initializers.zeros
  if not 0.0 < float(prior) < 1.0:
    raise ValueError(f"model.obj_bias_prior must be in (0, 1), got {prior}")

  def init(key, shape, dtype=jnp.float32):
    del key
    b = jnp.zeros(shape, dtype)
    idx = jnp.arange(NUM_SLOTS) * (5 + num_classes) + 4
    return b.at[idx].set(jnp.log(prior / (1.0 - prior)).astype(dtype))

  return init


class GuidedAnchorHead(nn.Module):
  """Head for one level; see the module docstring.

  Attributes:
    num_classes: number of classes C.
    rfb: apply the RFB block before the DCN (ASFF*).
    dtype: compute dtype (outputs ``raw`` and ``guide_wh`` are float32).
    obj_bias_prior: None (official zero bias) or the initial objectness π
      (:func:`objectness_bias_init`).
    dcn_formulation: ``'corners'`` or ``'patches'`` (:func:`~asff_jax.models.dcn.deform_conv2d`).
    class_head: ``'per_slot'`` (official: class logits per slot) or
      ``'shared'`` (one set per cell used by all slots) or ``'fused'`` (as
      ``'shared'``, read from the head input, bypassing the DCN); see the module docstring.

  Call with ``(B, H, W, C_in)``; returns a dict with ``'raw'``
  ``(B, H, W, 4·(5 + C))``, ``'guide_wh'`` ``(B, H, W, 8)``, ``'offset'``,
  ``'adapted'`` (and ``'rfb'``).
  """

  num_classes: int
  rfb: bool = False
  dtype: Any = jnp.float32
  obj_bias_prior: Optional[float] = None
  dcn_formulation: str = "corners"
  class_head: str = "per_slot"

  @nn.compact
  def __call__(self, x):
    if self.class_head not in CLASS_HEADS:
      raise ValueError(f"model.class_head must be one of {CLASS_HEADS}, got {self.class_head!r}")
    guide_wh = nn.Conv(2 * NUM_SLOTS, (1, 1), use_bias=True, dtype=self.dtype,
                       param_dtype=jnp.float32, kernel_init=conv_init, name="guide_wh")(x)
    guide_wh = guide_wh.astype(jnp.float32)
    out = FeatureAdaption(rfb=self.rfb, dtype=self.dtype, dcn_formulation=self.dcn_formulation,
                          name="feature_adaption")(x, guide_wh)
    shared = self.class_head in ("shared", "fused")
    per_slot = 5 + (0 if shared else self.num_classes)
    raw = nn.Conv(NUM_SLOTS * per_slot, (1, 1), use_bias=True, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=conv_init, name="conv",
                  bias_init=objectness_bias_init(per_slot - 5, self.obj_bias_prior))(
                      out["adapted"])
    if shared:
      cls = nn.Conv(self.num_classes, (1, 1), use_bias=True, dtype=self.dtype,
                    param_dtype=jnp.float32, kernel_init=conv_init, name="conv_cls")(
                        x if self.class_head == "fused" else out["adapted"])
      lead = raw.shape[:-1]
      raw = jnp.concatenate([
          raw.reshape(*lead, NUM_SLOTS, 5),
          jnp.broadcast_to(cls[..., None, :], (*lead, NUM_SLOTS, self.num_classes))], axis=-1)
      raw = raw.reshape(*lead, NUM_SLOTS * (5 + self.num_classes))
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
  """Decodes one level's head output to the official ``pred`` rows (spec §4).

  Args:
    raw: ``(B, H, W, 4·(5 + C))`` raw prediction-conv output.
    guide_wh: ``(B, H, W, 8)`` raw log-scales.
    stride: the level's stride in input pixels.
    anchor_bases: ``(4, 2)`` base (w, h) per slot (:func:`level_anchor_bases`).

  Returns:
    ``(B, 4·H·W, 5 + C)`` float32 rows ordered slot-major, then y, then x; columns
    cx, cy, w, h (input pixels), objectness probability, class probabilities.
  """
  b, h, w, ch = raw.shape
  n = ch // NUM_SLOTS
  p = raw.astype(jnp.float32).reshape(b, h, w, NUM_SLOTS, n)
  g = guide_wh.astype(jnp.float32).reshape(b, h, w, NUM_SLOTS, 2)
  anchors_wh = jnp.exp(g) * jnp.asarray(anchor_bases)
  gx = jnp.arange(w, dtype=jnp.float32)[None, None, :, None]
  gy = jnp.arange(h, dtype=jnp.float32)[None, :, None, None]
  cx = (jax.nn.sigmoid(p[..., 0]) + gx) * stride
  cy = (jax.nn.sigmoid(p[..., 1]) + gy) * stride
  wh = jnp.exp(p[..., 2:4]) * anchors_wh
  rest = jax.nn.sigmoid(p[..., 4:])
  dec = jnp.concatenate([cx[..., None], cy[..., None], wh, rest], axis=-1)
  return jnp.transpose(dec, (0, 3, 1, 2, 4)).reshape(b, NUM_SLOTS * h * w, n)
