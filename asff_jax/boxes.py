"""Box utilities: conversions, IoUs, rescaling. A leaf module (depends only on numpy / jax.numpy).

Conventions used throughout asff_jax:

* ``xywh``: ``(..., 4)`` as ``[cx, cy, w, h]`` — centre and size (the official
  label and prediction format, spec §4 and §6).
* ``xyxy``: ``(..., 4)`` as ``[x1, y1, x2, y2]`` — corners, continuous
  coordinates (no ``+1`` pixel convention), as in the official ``postprocess``.
* Units are whatever the caller uses (input pixels in the model and loss,
  original-image pixels after evaluation rescaling); nothing here normalises.

Every function works for numpy and jax arrays alike (it uses ``jnp``) and is
jit-compatible. Broadcasting follows numpy rules on the leading dimensions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def xywh_to_xyxy(boxes):
  """``(..., 4)`` ``[cx, cy, w, h]`` -> ``(..., 4)`` ``[x1, y1, x2, y2]``."""
  c, wh = boxes[..., :2], boxes[..., 2:4]
  return jnp.concatenate([c - wh / 2, c + wh / 2], axis=-1)


def box_area(boxes_xyxy):
  """``(..., 4)`` xyxy -> ``(...)`` area; negative extents count as 0."""
  wh = jnp.clip(boxes_xyxy[..., 2:4] - boxes_xyxy[..., :2], 0)
  return wh[..., 0] * wh[..., 1]


def pairwise_iou(a_xyxy, b_xyxy, eps: float = 0.0):
  """IoU of every box in ``a`` with every box in ``b``.

  Args:
    a_xyxy: ``(..., N, 4)`` corners.
    b_xyxy: ``(..., M, 4)`` corners (same leading dims as ``a`` or broadcastable).
    eps: added to the union. The official ``bboxes_iou`` (ignore mask, NMS) uses 0;
      its ``IOUloss`` uses 1e-16 (spec §6, parity README quirk 6).

  Returns:
    ``(..., N, M)`` IoU in [0, 1]. Disjoint or degenerate pairs give 0 (with
    ``eps=0`` two zero-area boxes give 0, not NaN).
  """
  a = a_xyxy[..., :, None, :]
  b = b_xyxy[..., None, :, :]
  return elementwise_iou(a, b, eps=eps)


def elementwise_iou(a_xyxy, b_xyxy, eps: float = 0.0):
  """IoU of corresponding boxes: ``(..., 4)``, ``(..., 4)`` -> ``(...)`` (broadcasting)."""
  tl = jnp.maximum(a_xyxy[..., :2], b_xyxy[..., :2])
  br = jnp.minimum(a_xyxy[..., 2:4], b_xyxy[..., 2:4])
  inter_wh = jnp.clip(br - tl, 0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = box_area(a_xyxy) + box_area(b_xyxy) - inter + eps
  safe = jnp.where(union > 0, union, 1.0)
  return jnp.where(union > 0, inter / safe, 0.0)


def elementwise_iou_xywh(a_xywh, b_xywh, eps: float = 0.0):
  """IoU of corresponding ``[cx, cy, w, h]`` boxes: ``(..., 4)`` x2 -> ``(...)``."""
  return elementwise_iou(xywh_to_xyxy(a_xywh), xywh_to_xyxy(b_xywh), eps=eps)


def wh_iou(a_wh, b_wh, eps: float = 0.0):
  """Centre-aligned IoU of box shapes (both boxes centred at the same point).

  Used by the official target assignment (GT shape vs the 9 prior anchors, and
  vs the predicted anchor-free shape) and by the guided-anchor shape loss
  ``IOUWH_loss`` (spec §6).

  Args:
    a_wh: ``(..., 2)`` ``[w, h]``.
    b_wh: ``(..., 2)`` ``[w, h]``, broadcastable against ``a_wh``.
    eps: added to the union (1e-16 in the official ``IOUWH_loss``).

  Returns:
    ``(...)`` IoU = min(w)·min(h) / (area_a + area_b − inter + eps).
  """
  inter = jnp.minimum(a_wh[..., 0], b_wh[..., 0]) * jnp.minimum(a_wh[..., 1], b_wh[..., 1])
  union = a_wh[..., 0] * a_wh[..., 1] + b_wh[..., 0] * b_wh[..., 1] - inter + eps
  safe = jnp.where(union > 0, union, 1.0)
  return jnp.where(union > 0, inter / safe, 0.0)


def rescale_boxes(boxes_xyxy, from_hw, to_hw):
  """Maps xyxy boxes between two sizes of one image, per axis: the one "back to the original" mapping.

  The official evaluation resizes every image to ``S × S`` without
  letterboxing (spec §5), so a box in input pixels maps to original-image
  pixels by ``x · W / S`` and ``y · H / S``; ``from_hw = (S, S)``, ``to_hw =
  (H, W)``. Used by evaluation, prediction, the Python API and export (where
  ``to_hw`` may be symbolic). numpy in → numpy out (float64 kept); jax in → jax out.

  Args:
    boxes_xyxy: ``(..., 4)`` ``[x1, y1, x2, y2]``.
    from_hw, to_hw: ``(height, width)`` of the two image sizes.
  """
  sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
  if isinstance(boxes_xyxy, jax.Array) or isinstance(sx, jax.Array):
    return boxes_xyxy * jnp.stack([sx, sy, sx, sy]).astype(boxes_xyxy.dtype)
  boxes_xyxy = np.asarray(boxes_xyxy)
  return boxes_xyxy * np.array([sx, sy, sx, sy]).astype(boxes_xyxy.dtype)
