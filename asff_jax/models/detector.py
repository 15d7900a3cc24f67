"""The full detector: backbone → neck → fusion → guided-anchor heads → decoded ``pred``.

One module assembled from the config (``config.model``, see
:mod:`asff_jax.config`) covers the official baseline, ASFF, ASFF* and the
Table 3 sum/concat variants on Darknet-53, and the official MobileNetV2
models (``backbone='mobilenet_v2'``: ReLU6, ``ASFFmobile`` or the mobile
baseline, heads without deformable adaption). Besides ``__call__`` it exposes its two stages,
so that tools such as :mod:`asff_jax.tools.probes` cut the model at the fusion
inputs with the model's own layers and options::

    xs = model.apply(variables, images, train, method=YOLOv3.features)        # (x^0, x^1, x^2)
    fused, head = model.apply(variables, l, xs, train, method=YOLOv3.level)   # y^l and its head
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from asff_jax.models.config import ANCHOR_MASKS, OFFICIAL_ANCHORS, STRIDES
from asff_jax.models.darknet import OFFICIAL_STAGE_BLOCKS, Darknet53
from asff_jax.models.fusion import DARKNET_INTER, MOBILE_INTER, LevelFusion
from asff_jax.models.mobilenet import MobileNetV2
from asff_jax.models.head import GuidedAnchorHead, decode_level, level_anchor_bases, pred_rows
from asff_jax.models.neck import YoloNeck


BACKBONES = ("darknet53", "mobilenet_v2")


class YOLOv3(nn.Module):
  """YOLOv3 strong baseline with optional ASFF (spec §2–§4).

  Attributes:
    num_classes: C.
    fusion: ``'asff' | 'none' | 'sum' | 'concat'``.
    rfb: RFB in the heads (ASFF*).
    compress_c: ASFF weight-conv channels (16; 8 with RFB).
    anchors: 9 prior (w, h) pairs in input pixels.
    backbone_type: ``'darknet53'`` or ``'mobilenet_v2'`` (the official ``yolov3_mobilev2.py``;
      config key ``model.backbone``).
    width, stage_blocks, dtype, dcn_formulation: see :mod:`asff_jax.config` (``model`` section).

  ``__call__(images, train=False, dropblock=None)``:

  * ``images``: ``(B, H, W, 3)`` float, ImageNet-normalised RGB, H and W
    multiples of 32.
  * ``train``: batch statistics in BN (pass ``mutable=['batch_stats']``).
  * ``dropblock``: None, or three ``(block_size, keep_prob)`` for the DropBlock
    positions (coarsest first), used only when ``train``; needs the
    ``'dropblock'`` RNG.

  Returns a dict:

  * ``'pred'``: ``(B, N, 5 + C)`` float32, N = 4·Σ H_l·W_l, the official row
    order (levels stride 32, 16, 8; slot-major, then y, then x) and columns
    (cx, cy, w, h in input pixels, objectness prob., class probs.).
  * ``'levels'``: list of 3 dicts (level 0 = stride 32), each with ``'raw'``
    ``(B, H, W, 4·(5 + C))``, ``'guide_wh'`` ``(B, H, W, 8)``, ``'offset'``
    ``(B, H, W, 72)``, ``'adapted'``, ``'head_input'`` (the fusion output)
    and, with RFB, ``'rfb'``; for ASFF also ``'fusion_weights'``
    ``(B, H, W, 3)`` = (α, β, γ) and ``'fused_sum'`` ``(B, H, W)``.
  * ``'backbone'``: (C3, C4, C5); ``'neck'``: (P5, P4, P3).

  Everything is returned; under ``jax.jit`` unused outputs cost nothing.

  Raises:
    ValueError: images not ``(B, H, W, 3)`` or H, W not multiples of 32.
  """

  num_classes: int = 80
  fusion: str = "asff"
  rfb: bool = False
  compress_c: int = 16
  anchors: Sequence[Sequence[float]] = OFFICIAL_ANCHORS
  width: float = 1.0
  stage_blocks: Sequence[int] = OFFICIAL_STAGE_BLOCKS
  dtype: Any = jnp.float32
  dcn_formulation: str = "corners"
  backbone_type: str = "darknet53"

  def setup(self):
    if self.backbone_type not in BACKBONES:
      raise ValueError(f"unknown backbone {self.backbone_type!r}; expected one of {BACKBONES}")
    mobile = self.backbone_type == "mobilenet_v2"
    act = "relu6" if mobile else "leaky"
    # Attribute names are the parameter-tree names.
    self.backbone = (MobileNetV2(self.width, self.dtype) if mobile else
                     Darknet53(self.width, self.stage_blocks, self.dtype))
    self.neck = YoloNeck(self.width, self.dtype, act=act, last_conv=not mobile)
    fusion = lambda l: LevelFusion(l, self.fusion, self.compress_c, self.width, self.dtype,
                                   inter=MOBILE_INTER if mobile else DARKNET_INTER, act=act)
    head = lambda: GuidedAnchorHead(self.num_classes, self.rfb, self.dtype, self.dcn_formulation,
                                    adaption=not mobile)
    # Explicit attribute names: they are the parameter-tree names (fusion_l, head_l).
    self.fusion_0, self.fusion_1, self.fusion_2 = fusion(0), fusion(1), fusion(2)
    self.head_0, self.head_1, self.head_2 = head(), head(), head()

  def backbone_and_neck(self, images, train: bool = False, dropblock=None):
    """``(B, H, W, 3)`` → ``(C3, C4, C5)`` and the neck outputs ``(P5, P4, P3)`` = (x^0, x^1, x^2)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    if images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f"input height and width must be multiples of 32, got {images.shape[1:3]}")
    feats = self.backbone(images.astype(self.dtype), train)
    return feats, self.neck(feats, train, dropblock)

  def features(self, images, train: bool = False, dropblock=None):
    """The fusion inputs x^0, x^1, x^2 (= the neck outputs P5, P4, P3) of ``images``."""
    return self.backbone_and_neck(images, train, dropblock)[1]

  def level(self, l: int, xs, train: bool = False):
    """Fusion and head of level ``l`` from the fusion inputs ``xs``.

    Returns ``(fused, head)``: the fusion dict (``'out'`` = y^l, and for ASFF
    ``'weights'`` (α, β, γ) and ``'fused_sum'``) and the head dict of
    :class:`~asff_jax.models.head.GuidedAnchorHead`.
    """
    fused = (self.fusion_0, self.fusion_1, self.fusion_2)[l](xs, train)
    head = (self.head_0, self.head_1, self.head_2)[l](fused["out"])
    return fused, head

  def __call__(self, images, train: bool = False, dropblock=None):
    feats, neck = self.backbone_and_neck(images, train, dropblock)
    levels, preds = [], []
    for l in range(3):
      fused, head = self.level(l, neck, train)
      head["head_input"] = fused["out"]
      if "weights" in fused:
        head["fusion_weights"] = fused["weights"]
        head["fused_sum"] = fused["fused_sum"]
      bases = level_anchor_bases(self.anchors, ANCHOR_MASKS[l], STRIDES[l])
      preds.append(pred_rows(decode_level(head["raw"], head["guide_wh"], stride=STRIDES[l],
                                          anchor_bases=bases)))
      levels.append(head)
    return {"pred": jnp.concatenate(preds, axis=1), "levels": levels, "backbone": feats, "neck": neck}
