"""Official ASFF target assignment, vectorised and jit-compatible (spec §4, §6).

The official head assigns targets in a Python loop over images and ground
truths (GTs). Here the same rules are computed for a whole padded label tensor
at once: no Python loop over boxes or images, no host round-trips, and
deterministic results under ``jax.jit`` (loops over the 3 levels are done by
the caller).

Conventions
-----------
* Layout is NHWC with the 4 prediction slots as an extra axis: per-cell tensors
  are ``(B, H, W, 4, ...)``. Slots 0-2 are anchor-based (the level's anchor mask
  in order), slot 3 is anchor-free (base size ``4 * stride``).
* ``labels``: ``(B, N, 5)`` rows ``[class, cx, cy, w, h]`` in **input pixels**,
  zero rows padding the end; or ``(B, N, 6)`` with a per-box mixup weight in the
  6th column (spec §6). Which rows are boxes follows the official rule (see
  :func:`gt_valid_mask`), judged on the first 5 columns only.
* Internally, boxes and anchors of a level are in **grid units** of that level
  (pixels / stride), as in the official head. Every quantity used here is
  either scale invariant (IoUs, ratios) or defined in grid units (the in-cell
  xy offsets), so the results equal those of a pixel-unit computation up to
  float rounding. Prior-anchor selection (``best_n``) and the anchor-free
  choice are done in input pixels once, so every GT has exactly one level.

Assignment rules (spec §6 "Target assignment", parity README quirks 2-5)
-------------------------------------------------------------------------
1. ``best_n`` = argmax over the 9 prior anchors of the centre-aligned wh-IoU
   (first index on ties, like ``np.argmax``). The GT belongs to the level whose
   anchor mask contains ``best_n``; its anchor-based slot is the position of
   ``best_n`` in that mask (``best_n % 3`` for the official masks).
2. Cell ``(j, i) = (trunc(cy / input_h * H), trunc(cx / input_w * W))``.
   Generalisation: the official code has no clip and would index out of range
   for a centre on the far image border; here the cell is clipped into the grid.
3. Anchor-free choice: slot 3 is responsible when IoU(GT wh, predicted
   anchor-free wh at the cell) is *strictly* greater than the GT's IoU with its
   best prior.
4. Ignore: every decoded prediction (all 4 slots) whose best IoU (no eps) with
   any GT of its image is ``> ignore_thre`` gets ``obj_mask = 0``. Images with
   no GT ignore nothing. This is computed *before* positives are written, so a
   positive always gets ``obj_mask = 1`` (or its mixup weight).
5. Last writer wins: when several GTs of an image write the same
   (level, slot, cell) the one with the largest GT index wins all targets,
   masks and ``tgt_scale``. Implemented with an order-independent scatter-max
   of GT indices (XLA scatter order for duplicate indices is unspecified, so
   plain ``.set`` is never used with duplicates), then gathers from the winner.
6. Classes: with label smoothing the winner's class gets ``1 - 1/C`` and all
   others ``1/C``. Without smoothing the official loop only sets the new class
   to 1 and never resets, so the target is multi-hot over *every* GT that wrote
   that slot and cell (scatter-max of one-hots).
7. Guided-anchor shape targets: both the anchor-based slot ``a`` and slot 3 at
   the cell get ``anchor_mask = 1`` and the GT's wh as target, whichever slot
   is responsible. Slot 3 is written by every GT of the level at that cell, so
   its target comes from the last of them, which may differ from the GT that
   owns the slot-3 positive (independent winner maps).
8. ``tgt_scale = 2 - w*h / (input_w*input_h)`` (w, h in pixels). The official
   code uses ``size**2`` because its input is always square; the product is the
   natural generalisation to non-square inputs and identical for square ones.

Optional (off by default): the paper's adjacent ignore regions (Table 2),
see :func:`adjacent_ignore_mask`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax import boxes as box_lib
from asff_jax.models.config import ANCHOR_MASKS, STRIDES
from asff_jax.models.config import OFFICIAL_ANCHORS as ANCHORS  # (121, 240) set, spec §4
from asff_jax.models import head as head_lib


class LevelTargets(NamedTuple):
  """Targets of one level. Dense arrays are ``(B, H, W, 4, ...)``; per-GT ``(B, N)``.

  Dense (per cell and slot):
    positive: bool — responsible slot (coord_mask = cls_mask = 1).
    obj_mask: float32 — objectness weight: 1, 0 where ignored, the mixup weight
      (1 without mixup) at positives.
    xy_target: ``(..., 2)`` in-cell offsets ``[cx*W/in_w - i, cy*H/in_h - j]``.
    box_target: ``(..., 4)`` GT ``[cx, cy, w, h]`` in grid units (0 off positives).
    tgt_scale: ``2 - w*h/(in_w*in_h)`` at positives, 0 elsewhere.
    cls_target: ``(..., C)`` class targets (0 where ``cls_mask`` is False).
    cls_mask: bool — where the class loss applies: ``positive`` (official).
    anchor_mask: bool — guided-anchor shape loss mask.
    anchor_target_wh: ``(..., 2)`` GT wh in grid units where ``anchor_mask``.
    ignored: bool — IoU-based ignore (rule 4), before positives are written.
    adjacent_ignored: bool ``(B, H, W)`` — paper's adjacent ignore region
      (all False unless enabled), before positives are written.
  Per GT:
    valid: bool — row is a box.
    in_level: bool — valid and assigned to this level.
    best_n: int32 — best prior anchor 0..8.
    slot: int32 — responsible slot (0..3) at this level (meaningful if in_level).
    j, i: int32 — cell row / column at this level.
    overwritten: bool — in_level and a later GT writes the same (slot, j, i).
    best_prior_iou, free_iou: float32 — IoU with best prior / predicted
      anchor-free shape at the cell (input pixels, centre-aligned).
  """
  positive: jax.Array
  obj_mask: jax.Array
  xy_target: jax.Array
  box_target: jax.Array
  tgt_scale: jax.Array
  cls_target: jax.Array
  cls_mask: jax.Array
  anchor_mask: jax.Array
  anchor_target_wh: jax.Array
  ignored: jax.Array
  adjacent_ignored: jax.Array
  valid: jax.Array
  in_level: jax.Array
  best_n: jax.Array
  slot: jax.Array
  j: jax.Array
  i: jax.Array
  overwritten: jax.Array
  best_prior_iou: jax.Array
  free_iou: jax.Array


def _level_of_anchor(anchor_masks):
  """Static numpy tables ``(level, position)`` indexed by prior: its level and
  its position (anchor-based slot) in that level's mask.

  Raises:
    ValueError: a prior in no mask.
  """
  n = sum(len(m) for m in anchor_masks)
  lvl = np.full((n,), -1, np.int32)
  pos = np.full((n,), -1, np.int32)
  for l, m in enumerate(anchor_masks):
    for p, a in enumerate(m):
      lvl[a] = l
      pos[a] = p
  if (lvl < 0).any():
    raise ValueError(f"anchor_masks {anchor_masks} do not cover every anchor")
  return lvl, pos


def level_geometry(level: int, grid_hw: Sequence[int], input_hw: Sequence[int],
                   anchors=ANCHORS, anchor_masks=ANCHOR_MASKS):
  """Static per-level constants.

  Args:
    level: 0, 1, 2 (strides 32, 16, 8).
    grid_hw: ``(H, W)`` of the level's feature map.
    input_hw: ``(input_h, input_w)`` in pixels.

  Returns:
    ``(stride, slot_anchors_px)`` with ``slot_anchors_px`` a ``(4, 2)`` float32
    numpy array: the level's 3 prior anchors then the anchor-free base size.

  Raises:
    ValueError: unknown level, or ``grid * stride != input`` size.
  """
  if level not in (0, 1, 2):
    raise ValueError(f"level must be 0, 1 or 2, got {level}")
  stride = STRIDES[level]
  h, w = grid_hw
  in_h, in_w = input_hw
  if h * stride != in_h or w * stride != in_w:
    raise ValueError(f"level {level}: grid {h}x{w} * stride {stride} != input {in_h}x{in_w}")
  anchors = np.asarray(anchors, np.float32)
  if anchors.shape != (9, 2):
    raise ValueError(f"anchors must be (9, 2), got {anchors.shape}")
  return stride, head_lib.level_anchor_bases(anchors, anchor_masks[level], stride)


def decode_level(raw, guide_wh, *, level: int, input_hw, anchors=ANCHORS,
                 anchor_masks=ANCHOR_MASKS):
  """:func:`asff_jax.models.head.decode_level` of one level, with its geometry checked.

  Args:
    raw: ``(B, H, W, 4*(5+C))`` prediction-conv output, channel ``(5+C)*slot + c``.
    guide_wh: ``(B, H, W, 8)`` raw guide_wh (channel ``2a`` log-w, ``2a+1`` log-h).
    level: 0, 1, 2.
    input_hw: ``(input_h, input_w)`` pixels (static).

  Returns:
    dict with ``out``, ``anchor_wh``, ``box`` in grid units and ``stride`` (see
    :func:`asff_jax.models.head.decode_level`).

  Raises:
    ValueError: bad shapes (see :func:`level_geometry`), channel count not
      divisible by 4, or guide_wh not 8 channels.
  """
  stride, slot_anchors = level_geometry(level, raw.shape[1:3], input_hw, anchors, anchor_masks)
  return head_lib.decode_level(raw, guide_wh, stride=stride, anchor_bases=slot_anchors)


def gt_valid_mask(labels):
  """``(B, N, 5|6)`` -> ``(B, N)`` bool: which label rows are boxes.

  Official rule (spec §6): ``n_b`` = number of rows whose first-5-column sum is
  > 0, and the first ``n_b`` rows are the boxes (labels are zero-padded at the
  end). The mixup column is not looked at. Like the official code this assumes
  padding only at the end: an all-zero row *between* boxes would still be
  counted by position (and a later box dropped), so callers must not leave
  holes.
  """
  n = jnp.sum(jnp.sum(labels[..., :5], -1) > 0, -1)
  return jnp.arange(labels.shape[1])[None, :] < n[:, None]


def prior_assignment(labels, *, anchors=ANCHORS, anchor_masks=ANCHOR_MASKS):
  """Best prior and level of every GT (spec §6 steps 2-3), in input pixels.

  Returns:
    ``(valid, best_n, best_iou, gt_level, gt_slot)``, each ``(B, N)``; ``gt_level``
    is -1 for padding rows; ``gt_slot`` is the anchor-based slot (position of
    ``best_n`` in its mask).
  """
  lvl_tab, pos_tab = _level_of_anchor(anchor_masks)
  valid = gt_valid_mask(labels)
  gt_wh = labels[..., 3:5].astype(jnp.float32)
  ious = box_lib.wh_iou(gt_wh[:, :, None, :], jnp.asarray(anchors, jnp.float32))
  best_n = jnp.argmax(ious, -1).astype(jnp.int32)
  best_iou = jnp.max(ious, -1)
  gt_level = jnp.where(valid, jnp.asarray(lvl_tab)[best_n], -1)
  gt_slot = jnp.asarray(pos_tab)[best_n]
  return valid, best_n, best_iou, gt_level, gt_slot


def _cells(labels, grid_hw, input_hw):
  """GT centres in grid units ``(B, N)`` x2 and truncated, clipped cells ``j, i``."""
  h, w = grid_hw
  in_h, in_w = input_hw
  tx = labels[..., 1].astype(jnp.float32) / in_w * w
  ty = labels[..., 2].astype(jnp.float32) / in_h * h
  i = jnp.clip(tx.astype(jnp.int32), 0, w - 1)
  j = jnp.clip(ty.astype(jnp.int32), 0, h - 1)
  return tx, ty, j, i


def adjacent_ignore_mask(labels, gt_level, *, level: int, grid_hw, input_hw,
                         eps: float):
  """Paper's adjacent ignore regions (Sec. 3.3 / Table 2), ``(B, H, W)`` bool.

  Definition chosen here (the paper gives no formula): for every GT assigned
  to level ``l±1`` (the two levels adjacent to its own), the ignore region at
  this level is the GT box shrunk about its centre to ``eps`` of its width and
  height, ``[cx - eps*w/2, cx + eps*w/2] x [cy - eps*h/2, cy + eps*h/2]``
  (input pixels), and every cell of this level that contains at least one
  point of that closed rectangle is ignored (objectness weight 0, all 4
  slots). With ``eps = 0`` this is exactly the cell containing the GT centre
  ("center location" row of Table 2). Cells are computed by the same truncation
  as the positive cell, clipped into the grid. Positives of this level are
  written afterwards and always win.

  Raises:
    ValueError: ``eps < 0``.
  """
  if eps < 0:
    raise ValueError(f"adjacent_ignore_eps must be >= 0, got {eps}")
  i0, i1, j0, j1 = _box_cell_span(labels, eps, grid_hw, input_hw)
  adjacent = (gt_level >= 0) & (jnp.abs(gt_level - level) == 1)  # padding rows have -1
  return jnp.any(_cell_rect(i0, i1, j0, j1, grid_hw) & adjacent[..., None, None], axis=1)


def _box_cell_span(labels, scale: float, grid_hw, input_hw):
  """Cell ranges ``(i0, i1, j0, j1)``, each ``(B, N)`` int32 inclusive, of every GT box
  shrunk about its centre to ``scale`` of its width and height (same truncation as the
  centre cell, clipped into the grid; negative coordinates truncate to the first cell)."""
  h, w = grid_hw
  in_h, in_w = input_hw
  lab = labels.astype(jnp.float32)
  cx, cy, bw, bh = lab[..., 1], lab[..., 2], lab[..., 3], lab[..., 4]

  def span(c, size, in_size, n):
    lo = jnp.clip(((c - scale * size / 2) / in_size * n).astype(jnp.int32), 0, n - 1)
    hi = jnp.clip(((c + scale * size / 2) / in_size * n).astype(jnp.int32), 0, n - 1)
    return lo, hi

  i0, i1 = span(cx, bw, in_w, w)
  j0, j1 = span(cy, bh, in_h, h)
  return i0, i1, j0, j1


def _cell_rect(i0, i1, j0, j1, grid_hw):
  """``(B, N, H, W)`` bool: cells inside the inclusive ranges ``[j0, j1] x [i0, i1]``."""
  h, w = grid_hw
  cols = jnp.arange(w)[None, None, None, :]
  rows = jnp.arange(h)[None, None, :, None]
  return ((cols >= i0[..., None, None]) & (cols <= i1[..., None, None]) &
          (rows >= j0[..., None, None]) & (rows <= j1[..., None, None]))


def _winner_map(num_keys, keys, gt_index, writes):
  """``(B, num_keys)`` int32: per key the largest writing GT index, -1 if none.

  Order-independent (scatter-max), hence deterministic under XLA, where the
  order of duplicate ``.set`` updates is unspecified.
  """
  b = keys.shape[0]
  bidx = jnp.broadcast_to(jnp.arange(b)[:, None], keys.shape)
  init = jnp.full((b, num_keys), -1, jnp.int32)
  return init.at[bidx, keys].max(jnp.where(writes, gt_index, -1))


def _gather_gt(values, winner):
  """Gather per-GT ``(B, N, K)`` values at per-key winners ``(B, M)`` -> ``(B, M, K)``, 0 if none."""
  idx = jnp.maximum(winner, 0)[..., None]
  got = jnp.take_along_axis(values, idx, axis=1)
  return jnp.where(winner[..., None] >= 0, got, 0)


def assign_level(labels, decoded, *, level: int, num_classes: int, input_hw,
                 anchors=ANCHORS, anchor_masks=ANCHOR_MASKS, ignore_thre: float = 0.7,
                 label_smoothing: bool = True, adjacent_ignore_eps=None) -> LevelTargets:
  """Official target assignment for one level (spec §6; module docstring rules 1-8).

  Args:
    labels: ``(B, N, 5)`` or ``(B, N, 6)`` float, input pixels (6th col = mixup weight).
    decoded: output of :func:`decode_level` for this level. Only its ``box`` and
      ``anchor_wh`` are used, under ``stop_gradient``: every decision here is
      discrete, and the non-detached wh target is built by the loss.
    level: 0, 1, 2. num_classes: C. input_hw: ``(input_h, input_w)`` pixels.
    ignore_thre: IoU above which a prediction's objectness is ignored (0.7).
    label_smoothing: official LABAL_SMOOTH (see rule 6).
    adjacent_ignore_eps: ``None`` (off, official) or a float >= 0, see
      :func:`adjacent_ignore_mask`.

  Returns:
    :class:`LevelTargets`.

  Raises:
    ValueError: labels not ``(B, N, 5|6)``; negative ``adjacent_ignore_eps``.
  """
  if labels.ndim != 3 or labels.shape[-1] not in (5, 6):
    raise ValueError(f"labels must be (B, N, 5|6), got {labels.shape}")
  box = jax.lax.stop_gradient(decoded["box"])
  anchor_wh = jax.lax.stop_gradient(decoded["anchor_wh"])
  stride = decoded["stride"]
  b, h, w, s, _ = box.shape
  n = labels.shape[1]
  in_h, in_w = input_hw
  c = num_classes
  lab = labels.astype(jnp.float32)

  valid, best_n, best_iou, gt_level, gt_slot = prior_assignment(
      lab, anchors=anchors, anchor_masks=anchor_masks)
  in_level = gt_level == level
  tx, ty, j, i = _cells(lab, (h, w), input_hw)
  gt_w = lab[..., 3] / in_w * w  # grid units
  gt_h = lab[..., 4] / in_h * h
  gt_box = jnp.stack([tx, ty, gt_w, gt_h], -1)  # (B, N, 4)

  # Rule 4: ignore mask from all decoded predictions, before positives.
  pred_xyxy = box_lib.xywh_to_xyxy(box.reshape(b, h * w * s, 4))
  ious = box_lib.pairwise_iou(pred_xyxy, box_lib.xywh_to_xyxy(gt_box))  # (B, M, N)
  best_pred_iou = jnp.max(jnp.where(valid[:, None, :], ious, 0.0), -1)
  ignored = (best_pred_iou > ignore_thre).reshape(b, h, w, s)
  if adjacent_ignore_eps is None:
    adjacent = jnp.zeros((b, h, w), bool)
  else:
    adjacent = adjacent_ignore_mask(lab, gt_level, level=level, grid_hw=(h, w),
                                    input_hw=input_hw, eps=float(adjacent_ignore_eps))

  # Rule 3: anchor-free vs anchor-based, in input pixels.
  cell = j * w + i
  free_px = jnp.take_along_axis(anchor_wh[:, :, :, 3, :].reshape(b, h * w, 2),
                                cell[..., None], axis=1) * stride  # (B, N, 2)
  free_iou = box_lib.wh_iou(lab[..., 3:5], free_px)
  slot = jnp.where(free_iou > best_iou, 3, gt_slot).astype(jnp.int32)

  gt_index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
  m = h * w * s
  # Rule 5: positives, last writer wins.
  pos_key = cell * s + slot
  pos_win = _winner_map(m, pos_key, gt_index, in_level)
  overwritten = in_level & (jnp.take_along_axis(pos_win, pos_key, axis=1) != gt_index)
  positive = pos_win >= 0

  mix = lab[..., 5] if lab.shape[-1] == 6 else jnp.ones((b, n), jnp.float32)
  tgt_scale_gt = 2.0 - lab[..., 3] * lab[..., 4] / (in_w * in_h)
  per_gt = jnp.stack([tx - i, ty - j, tx, ty, gt_w, gt_h, tgt_scale_gt, mix], -1)
  g = _gather_gt(per_gt, pos_win)  # (B, M, 8)
  xy_target = g[..., 0:2]
  box_target = g[..., 2:6]
  tgt_scale = g[..., 6]
  weight = g[..., 7]

  obj_mask = jnp.where(ignored.reshape(b, m) | jnp.repeat(adjacent.reshape(b, h * w), s, axis=1),
                       0.0, 1.0)
  obj_mask = jnp.where(positive, weight, obj_mask)

  # Rule 6: classes.
  cls_id = jnp.clip(lab[..., 0].astype(jnp.int32), 0, c - 1)
  if label_smoothing:
    win_cls = jnp.take_along_axis(cls_id, jnp.maximum(pos_win, 0), axis=1)
    cls_target = jnp.where(jax.nn.one_hot(win_cls, c, dtype=jnp.float32) > 0,
                           1.0 - 1.0 / c, 1.0 / c)
    cls_target = jnp.where(positive[..., None], cls_target, 0.0)
  else:
    bidx = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
    cls_target = jnp.zeros((b, m, c), jnp.float32).at[bidx, pos_key, cls_id].max(
        in_level.astype(jnp.float32))
  cls_mask = positive

  # Rule 7: guided-anchor shape targets (slot a and slot 3), own winners.
  anc_key = jnp.concatenate([cell * s + gt_slot, cell * s + (s - 1)], 1)
  anc_win = _winner_map(m, anc_key, jnp.concatenate([gt_index, gt_index], 1),
                        jnp.concatenate([in_level, in_level], 1))
  anchor_mask = anc_win >= 0
  anchor_target_wh = _gather_gt(jnp.stack([gt_w, gt_h], -1), anc_win)

  dense = lambda x, *tail: x.reshape((b, h, w, s) + tail)
  return LevelTargets(
      positive=dense(positive), obj_mask=dense(obj_mask),
      xy_target=dense(xy_target, 2), box_target=dense(box_target, 4),
      tgt_scale=dense(tgt_scale), cls_target=dense(cls_target, c), cls_mask=dense(cls_mask),
      anchor_mask=dense(anchor_mask), anchor_target_wh=dense(anchor_target_wh, 2),
      ignored=ignored, adjacent_ignored=adjacent,
      valid=valid, in_level=in_level, best_n=best_n, slot=slot, j=j, i=i,
      overwritten=overwritten, best_prior_iou=best_iou, free_iou=free_iou)


def assignment_table(level_targets: Sequence[LevelTargets]):
  """Host-side summary like the parity fixture's ``assign`` (for tests/debugging).

  Args:
    level_targets: the 3 :class:`LevelTargets` of one batch (levels 0, 1, 2).

  Returns:
    ``(assign, best_n, overwritten)`` numpy arrays: ``assign`` ``(G, 6)`` int32
    rows ``[image, gt_index, level, slot, j, i]`` for every valid GT, sorted by
    (image, gt_index); ``best_n`` ``(G,)`` int32; ``overwritten`` ``(G,)`` uint8.
    Not jit-compatible (variable G).
  """
  rows, bn, ow = [], [], []
  for lvl, t in enumerate(level_targets):
    in_level = np.asarray(t.in_level)
    img, gt = np.nonzero(in_level)
    rows.append(np.stack([img, gt, np.full_like(img, lvl), np.asarray(t.slot)[img, gt],
                          np.asarray(t.j)[img, gt], np.asarray(t.i)[img, gt]], 1))
    bn.append(np.asarray(t.best_n)[img, gt])
    ow.append(np.asarray(t.overwritten)[img, gt])
  rows = np.concatenate(rows, 0).astype(np.int32)
  order = np.lexsort((rows[:, 1], rows[:, 0]))
  return (rows[order], np.concatenate(bn)[order].astype(np.int32),
          np.concatenate(ow)[order].astype(np.uint8))
