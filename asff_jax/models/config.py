"""Anchor sets, anchor masks and strides of the three levels (spec §4).

Level 0 is the coarsest (stride 32), as in the official code. The model
section of the config (``config.model``) is declared with the rest of the
schema in :mod:`asff_jax.config`.
"""

from __future__ import annotations

from asff_jax.errors import ConfigError

OFFICIAL_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (42, 119),
                    (116, 90), (156, 198), (121, 240))
YOLOV3_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (42, 119),
                  (116, 90), (156, 198), (373, 326))
# Anchor indices per level; level 0 is stride 32 (spec §4).
ANCHOR_MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
STRIDES = (32, 16, 8)


def resolve_anchors(anchors):
  """``'official' | 'yolov3' | sequence of 9 (w, h)`` → tuple of 9 float pairs (input pixels).

  Raises:
    ConfigError: for an unknown name or a list that is not 9 positive pairs.
  """
  if isinstance(anchors, str):
    table = {"official": OFFICIAL_ANCHORS, "yolov3": YOLOV3_ANCHORS}
    if anchors not in table:
      raise ConfigError(f"model.anchors: unknown anchor set {anchors!r}; use 'official', 'yolov3' "
                        "or 9 (w, h) pairs")
    anchors = table[anchors]
  out = tuple((float(a[0]), float(a[1])) for a in anchors)
  if len(out) != 9 or any(w <= 0 or h <= 0 for w, h in out):
    raise ConfigError(f"model.anchors must be 9 positive (w, h) pairs, got {anchors!r}")
  return out
