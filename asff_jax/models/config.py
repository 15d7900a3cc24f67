"""Default model configuration (``config.model``) and the anchor sets.

Keys (all overridable with ``--config.model.KEY=VALUE``):

* ``num_classes``: 80 for COCO.
* ``fusion``: ``'asff'`` (paper Eq. 1–2), ``'none'`` (official strong
  baseline), ``'sum'`` or ``'concat'`` (paper Table 3 alternatives).
* ``rfb``: RFB block in each head before the DCN, compress_c 8 (ASFF*).
* ``dropblock``: enables the DropBlock layers (the training schedule passes the
  block sizes and keep probability per step; identity at eval).
* ``anchors``: ``'official'`` (YOLOv3 set with the official (121, 240) in
  place of (373, 326), spec §4/§12), ``'yolov3'`` (the original set), or an
  explicit list of 9 ``(w, h)`` pairs in input pixels, sorted small→large
  (set a list inside ``with config.ignore_type():``, the field defaults to a string).
* ``width``: channel multiplier (1.0 = official; e.g. 0.25 for CPU tests).
* ``stage_blocks``: Darknet residual blocks per stage (official (1, 2, 8, 8, 4)).
* ``compress_c``: ASFF weight-conv channels; None → 16, or 8 with RFB.
* ``dtype``: ``'float32'``, or ``'bfloat16'`` (bf16 compute, float32 params).
* ``dcn_formulation``: how the head's deformable conv is computed, ``'corners'``
  (default) or ``'patches'`` — same values and gradients, different speed
  (:func:`asff_jax.models.dcn.deform_conv2d`; ``'patches'`` is faster in the
  training step at small widths on CPU, ``'corners'`` at full width).
* ``class_head``: ``'per_slot'`` (official: each of a cell's 4 slots has its
  own class logits), ``'shared'`` (not official: one set of class logits per
  cell, used by every slot) or ``'fused'`` (not official: as ``'shared'`` but
  computed from the fusion output, bypassing the DCN; :mod:`asff_jax.models.head`).
"""

from __future__ import annotations

import ml_collections

OFFICIAL_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (42, 119),
                    (116, 90), (156, 198), (121, 240))
YOLOV3_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (42, 119),
                  (116, 90), (156, 198), (373, 326))
# Anchor indices per level; level 0 is stride 32 (spec §4).
ANCHOR_MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
STRIDES = (32, 16, 8)


def default_model_config() -> ml_collections.ConfigDict:
  """The official ASFF model (``--asff``, 40.6 AP configuration) at full width."""
  c = ml_collections.ConfigDict()
  c.num_classes = 80
  c.fusion = "asff"
  c.rfb = False
  c.dropblock = False
  c.anchors = "official"
  c.width = 1.0
  c.stage_blocks = (1, 2, 8, 8, 4)
  c.compress_c = ml_collections.config_dict.placeholder(int)
  # None = official (zero bias); π in (0, 1): objectness bias starts at logit(π) (not official)
  c.obj_bias_prior = ml_collections.config_dict.placeholder(float)
  c.dtype = "float32"
  c.dcn_formulation = "corners"
  c.class_head = "per_slot"
  return c


def resolve_anchors(anchors):
  """``'official' | 'yolov3' | sequence of 9 (w, h)`` → tuple of 9 float pairs.

  Raises:
    ValueError: for an unknown name or a list that is not 9 positive pairs.
  """
  if isinstance(anchors, str):
    table = {"official": OFFICIAL_ANCHORS, "yolov3": YOLOV3_ANCHORS}
    if anchors not in table:
      raise ValueError(f"model.anchors: unknown anchor set {anchors!r}; use 'official', 'yolov3' or 9 (w, h) pairs")
    anchors = table[anchors]
  out = tuple((float(a[0]), float(a[1])) for a in anchors)
  if len(out) != 9 or any(w <= 0 or h <= 0 for w, h in out):
    raise ValueError(f"model.anchors must be 9 positive (w, h) pairs, got {anchors!r}")
  return out
