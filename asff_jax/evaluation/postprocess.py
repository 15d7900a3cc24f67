"""Post-processing of decoded ASFF predictions: score, threshold, per-class NMS,
optional max-detections cap. Source: spec §5 (official ``utils/utils.py:
postprocess``) and the parity README (``pred`` / ``detections``).

Input convention (the model's eval output, spec §4):

* ``pred``: ``(B, N, 5 + C)``; columns ``cx, cy, w, h`` in **input pixels**
  (the square network input, e.g. 416 or 608), then the objectness probability,
  then ``C`` class probabilities (independent sigmoids, already applied).

Official semantics (spec §5), reproduced by :func:`postprocess_reference`:

1. corners ``x1 = cx - w/2`` etc. (continuous coordinates, no ``+1``);
2. per box ``class_conf = max_c p_c`` and ``class_id = argmax_c p_c`` (first
   index on ties) — one label per box;
3. score ``= obj * class_conf`` (float32); keep boxes with
   ``score >= conf_thre`` (compared in float32, as torch does);
4. for each class present, ascending id: greedy NMS (``torchvision.ops.nms``)
   with candidates in descending, *stable* score order (ties: lower row index
   first); a box is dropped when its IoU with an already kept box of the same
   class is ``> nms_thre``. The IoU has no eps. ``torchvision`` compares the
   float32 IoU with the threshold as a C ``double``; both implementations here
   reproduce exactly that comparison;
5. concatenate; rows ``[x1, y1, x2, y2, obj, class_conf, class_id]``.
6. The official code has no top-k or max-detections cap (COCOeval itself keeps
   the 100 best per image).

Thresholds of the official code: ``eval.py`` (the reported AP) conf 0.001 /
NMS 0.65; ``demo.py`` and the cfg ``TEST`` section conf 0.01 / NMS 0.65 (NMS was
0.6 before commit f781421; the paper says 0.6). COCO keeps 100 detections per
image.

Two implementations:

* :func:`postprocess_reference` — plain numpy, a Python loop over boxes; the
  semantic reference (and what to use when bit-faithful official rows are
  wanted).
* :func:`nms_fixed` — static shapes, jit / vmap compatible, no host callbacks.
  Per-class suppression uses a **class-equality mask** (a box can only suppress
  boxes of its own class), not the coordinate-offset trick: the offset trick
  adds large constants to the coordinates, which changes the float32 IoUs and
  so can flip threshold decisions relative to the official per-class NMS. With
  the mask the IoUs are bit-identical to the per-class computation.
  Candidates are the ``pre_nms_topk`` best scores (stable top-k); greedy
  suppression is a ``lax.fori_loop`` over the sorted candidates, each step
  suppressing a vectorised row of the ``(K, K)`` IoU matrix (materialised for
  small ``K``, computed row by row otherwise to keep memory ``O(K)``). Whenever
  ``pre_nms_topk`` is at least the number of boxes passing ``conf_thre`` the
  result equals the reference's top ``max_detections`` rows.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.boxes import elementwise_iou, pairwise_iou, xywh_to_xyxy

# Official eval defaults (spec §5).
COCO_EVAL_CONF_THRE = 0.001  # eval.py, the reported numbers
CFG_TEST_CONF_THRE = 0.01  # cfg TEST.CONFTHRE, demo.py, main.py periodic eval
NMS_THRE = 0.65  # eval.py / cfg TEST.NMSTHRE (0.6 in the paper / before f781421)
MAX_DETECTIONS = 100  # COCOeval maxDets
PRE_NMS_TOPK = 1000  # jit version only; the official code has no cap

# Above this many candidates the (K, K) IoU matrix is not materialised.
_MATERIALIZE_MAX_K = 2048


def _float32_floor(x: float) -> np.float32:
  """Largest float32 <= ``x``.

  For a float32 ``v``: ``v > x`` (compared in double, as torchvision's NMS
  does) iff ``v > _float32_floor(x)`` (compared in float32).
  """
  t = np.float32(x)
  if float(t) > float(x):
    t = np.nextafter(t, np.float32(-np.inf))
  return np.float32(t)


# ----------------------------------------------------------------------------
# numpy reference
# ----------------------------------------------------------------------------


def _np_iou_one_to_many(box, boxes):
  """float32 IoU of ``box`` (4,) with ``boxes`` (M, 4), xyxy, no eps.

  Same operation order as ``asff_jax.boxes.elementwise_iou`` and torchvision's
  CPU NMS kernel (``inter / (area_i + area_j - inter)``).
  """
  tl = np.maximum(box[:2], boxes[:, :2])
  br = np.minimum(box[2:4], boxes[:, 2:4])
  inter_wh = np.clip(br - tl, 0, None)
  inter = inter_wh[:, 0] * inter_wh[:, 1]
  wh_a = np.clip(box[2:4] - box[:2], 0, None)
  wh_b = np.clip(boxes[:, 2:4] - boxes[:, :2], 0, None)
  union = (wh_a[0] * wh_a[1] + wh_b[:, 0] * wh_b[:, 1]) - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
  return iou.astype(np.float32)


def _np_greedy_nms(boxes, nms_thre: float):
  """Greedy NMS on boxes already in descending score order; returns kept positions."""
  n = boxes.shape[0]
  suppressed = np.zeros(n, dtype=bool)
  kept = []
  thr = float(nms_thre)
  for i in range(n):
    if suppressed[i]:
      continue
    kept.append(i)
    if i + 1 < n:
      iou = _np_iou_one_to_many(boxes[i], boxes[i + 1:])
      suppressed[i + 1:] |= iou.astype(np.float64) > thr
  return np.asarray(kept, dtype=np.int64)


def postprocess_reference(pred,
                          conf_thre: float = CFG_TEST_CONF_THRE,
                          nms_thre: float = NMS_THRE,
                          max_detections: Optional[int] = None,
                          return_indices: bool = False):
  """Official post-processing (spec §5) in plain numpy.

  Args:
    pred: ``(B, N, 5 + C)`` decoded predictions (``cx, cy, w, h`` in input
      pixels, objectness probability, ``C`` class probabilities). Any float
      dtype (bfloat16 included); computed in float32. A single image
      ``(N, 5 + C)`` is accepted and treated as ``B = 1``.
    conf_thre: keep boxes with ``obj * class_conf >= conf_thre`` (float32
      comparison).
    nms_thre: per-class greedy NMS; a box is dropped when its IoU with a kept
      box is ``> nms_thre``.
    max_detections: ``None`` (official: no cap) keeps the official output order
      (classes ascending, descending score within a class). An int keeps the
      ``max_detections`` highest-scoring rows after NMS, **re-sorted by
      descending score** (ties: lower row index of ``pred`` first), which is
      the order of :func:`nms_fixed`.
    return_indices: also return, per image, the ``(K,)`` int64 row indices into
      ``pred`` of the kept boxes.

  Returns:
    A list of length ``B`` of ``(K_b, 7)`` float32 arrays with rows
    ``[x1, y1, x2, y2, obj, class_conf, class_id]`` (corners in input pixels;
    ``K_b`` may be 0). With ``return_indices`` a list of ``(rows, indices)``.
  """
  pred = np.asarray(pred)
  if pred.ndim == 2:
    pred = pred[None]
  pred = pred.astype(np.float32)
  conf32 = np.float32(conf_thre)
  outputs = []
  for p in pred:
    xy, wh = p[:, :2], p[:, 2:4]
    boxes = np.concatenate([xy - wh / np.float32(2), xy + wh / np.float32(2)], axis=1)
    cls_prob = p[:, 5:]
    class_conf = cls_prob.max(axis=1)
    class_id = cls_prob.argmax(axis=1)
    obj = p[:, 4]
    score = obj * class_conf
    cand = np.nonzero(score >= conf32)[0]
    kept_idx = []
    for c in np.unique(class_id[cand]):
      idx = cand[class_id[cand] == c]
      order = idx[np.argsort(-score[idx], kind="stable")]
      kept_idx.append(order[_np_greedy_nms(boxes[order], nms_thre)])
    kept_idx = (np.concatenate(kept_idx) if kept_idx else np.zeros((0,), np.int64))
    if max_detections is not None:
      order = np.lexsort((kept_idx, -score[kept_idx]))[:int(max_detections)]
      kept_idx = kept_idx[order]
    rows = np.concatenate([
        boxes[kept_idx], obj[kept_idx, None], class_conf[kept_idx, None],
        class_id[kept_idx, None].astype(np.float32)
    ], axis=1).astype(np.float32)
    outputs.append((rows, kept_idx) if return_indices else rows)
  return outputs


# ----------------------------------------------------------------------------
# jit-compatible fixed-size version
# ----------------------------------------------------------------------------


def nms_fixed_single(pred,
                     *,
                     conf_thre: float = COCO_EVAL_CONF_THRE,
                     nms_thre: float = NMS_THRE,
                     pre_nms_topk: int = PRE_NMS_TOPK,
                     max_detections: int = MAX_DETECTIONS,
                     materialize_iou: Optional[bool] = None,
                     sort_topk: bool = False):
  """Fixed-size per-class NMS of one image; see :func:`nms_fixed`.

  Args:
    pred: ``(N, 5 + C)`` decoded predictions of one image (any float dtype).
    Other arguments: Python constants, see :func:`nms_fixed`.

  Returns:
    dict with ``boxes (D, 4)``, ``scores (D,)``, ``classes (D,)`` int32,
    ``indices (D,)`` int32, ``num_valid ()`` int32, where ``D = max_detections``.
  """
  pred = jnp.asarray(pred).astype(jnp.float32)
  n = pred.shape[0]
  k = int(min(int(pre_nms_topk), n))
  d = int(max_detections)
  if k < 1 or d < 1:
    raise ValueError(f"pre_nms_topk and max_detections must be >= 1, got {pre_nms_topk}, {max_detections}")
  if materialize_iou is None:
    materialize_iou = k <= _MATERIALIZE_MAX_K
  conf32 = np.float32(conf_thre)
  thr32 = _float32_floor(nms_thre)

  boxes = xywh_to_xyxy(pred[:, :4])
  cls_prob = pred[:, 5:]
  class_conf = jnp.max(cls_prob, axis=-1)
  class_id = jnp.argmax(cls_prob, axis=-1).astype(jnp.int32)
  score = pred[:, 4] * class_conf
  valid = score >= conf32

  # Stable top-k (ties: lower index first), invalid boxes pushed to the end.
  key = jnp.where(valid, score, -jnp.inf)
  if sort_topk:  # plain StableHLO sort (portable to older consumers, e.g. TF's XlaCallModule)
    idx = jnp.argsort(-key, stable=True)[:k].astype(jnp.int32)
  else:
    _, idx = jax.lax.top_k(key, k)
  b = boxes[idx]
  s = score[idx]
  c = class_id[idx]
  v = valid[idx]  # a prefix of True then False
  n_cand = jnp.sum(v.astype(jnp.int32))
  pos = jnp.arange(k)

  if materialize_iou:
    iou = pairwise_iou(b, b)
    row_fn = lambda i: iou[i]
  else:
    row_fn = lambda i: elementwise_iou(b[i], b)

  def body(i, keep):
    row = row_fn(i)
    suppress = (row > thr32) & (c == c[i]) & (pos > i) & keep[i]
    return keep & ~suppress

  keep = jax.lax.fori_loop(0, n_cand, body, v)

  # Compact: kept candidates first, in their (descending score) order.
  order = jnp.argsort(~keep, stable=True)
  num_kept = jnp.sum(keep.astype(jnp.int32))
  if k < d:
    order = jnp.concatenate([order, jnp.zeros((d - k,), order.dtype)])
  order = order[:d]
  num_valid = jnp.minimum(num_kept, d).astype(jnp.int32)
  slot_ok = jnp.arange(d) < num_valid
  out_boxes = jnp.where(slot_ok[:, None], b[order], 0.0)
  out_scores = jnp.where(slot_ok, s[order], 0.0)
  out_classes = jnp.where(slot_ok, c[order], 0).astype(jnp.int32)
  out_indices = jnp.where(slot_ok, idx[order], -1).astype(jnp.int32)
  return dict(boxes=out_boxes, scores=out_scores, classes=out_classes, indices=out_indices,
              num_valid=num_valid)


@functools.partial(jax.jit,
                   static_argnames=("conf_thre", "nms_thre", "pre_nms_topk", "max_detections",
                                    "materialize_iou", "sort_topk"))
def nms_fixed(pred,
              *,
              conf_thre: float = COCO_EVAL_CONF_THRE,
              nms_thre: float = NMS_THRE,
              pre_nms_topk: int = PRE_NMS_TOPK,
              max_detections: int = MAX_DETECTIONS,
              materialize_iou: Optional[bool] = None,
              sort_topk: bool = False):
  """Fixed-size, jit/vmap-compatible official post-processing (spec §5).

  Semantics are those of :func:`postprocess_reference` (threshold, per-class
  greedy NMS with stable descending-score order, IoU without eps, drop when
  ``IoU > nms_thre``), plus two caps the official code does not have:

  * ``pre_nms_topk``: only the ``pre_nms_topk`` highest-scoring boxes passing
    ``conf_thre`` enter NMS (stable top-k). When it is ``>=`` the number of
    boxes passing ``conf_thre`` nothing is lost and the result equals the
    reference exactly.
  * ``max_detections``: the output keeps the best ``max_detections`` survivors.

  Per-class NMS uses a class-equality mask in the suppression step (not the
  coordinate-offset trick; see the module docstring). Compute is float32
  whatever the input dtype (float32, bfloat16, float16). Shapes are static;
  the greedy loop is a ``lax.fori_loop`` whose trip count is the (traced)
  number of candidates, each iteration a vectorised ``(K,)`` IoU-row update.
  Memory: ``O(K^2)`` when the IoU matrix is materialised (default for
  ``K <= 2048``), ``O(K)`` otherwise.

  This function is already ``jax.jit``-ed with the keyword arguments static;
  it can be called inside other jitted code and ``jax.vmap``-ed (e.g. over an
  extra leading axis). :func:`nms_fixed_single` is the un-batched kernel.

  Args:
    pred: ``(B, N, 5 + C)`` decoded predictions; ``cx, cy, w, h`` in input
      pixels, objectness probability, ``C`` class probabilities.
    conf_thre: score threshold (``obj * class_conf >= conf_thre``). Default
      0.001 (official COCO eval, ``eval.py``); the cfg TEST value is 0.01.
    nms_thre: IoU threshold, default 0.65 (official; the paper says 0.6).
    pre_nms_topk: candidates entering NMS, ``K = min(pre_nms_topk, N)``.
    max_detections: output size ``D`` (default 100, as COCO).
    sort_topk: select the candidates with a stable ``argsort`` instead of
      ``lax.top_k`` (same result, ~10x slower on CPU, negligible next to the
      network). ``lax.top_k`` lowers to a StableHLO composite newer than
      what TensorFlow's ``XlaCallModule`` reads, so the SavedModel export uses this.
    materialize_iou: ``True`` builds the ``(K, K)`` IoU matrix once, ``False``
      computes one row per step; ``None`` picks ``K <= 2048``. Same result.

  Returns:
    dict of
      ``boxes``: ``(B, D, 4)`` float32 xyxy corners in input pixels;
      ``scores``: ``(B, D)`` float32 ``obj * class_conf``;
      ``classes``: ``(B, D)`` int32 contiguous class index;
      ``indices``: ``(B, D)`` int32 row of ``pred`` each detection came from
        (``-1`` in padding);
      ``num_valid``: ``(B,)`` int32 number of real detections.
    Rows are sorted by descending score (ties: lower ``pred`` row first); rows
    ``>= num_valid`` are zero padding (``indices`` = -1).
  """
  fn = functools.partial(nms_fixed_single, conf_thre=conf_thre, nms_thre=nms_thre,
                         pre_nms_topk=pre_nms_topk, max_detections=max_detections,
                         materialize_iou=materialize_iou, sort_topk=sort_topk)
  return jax.vmap(fn)(pred)


def fixed_to_rows(out, pred=None):
  """Convert :func:`nms_fixed` output to a per-image list of numpy rows.

  Args:
    out: the dict returned by :func:`nms_fixed` (batched).
    pred: optional ``(B, N, 5 + C)`` predictions. When given the rows are the
      official ``[x1, y1, x2, y2, obj, class_conf, class_id]`` (``(K, 7)``);
      otherwise ``[x1, y1, x2, y2, score, class_id]`` (``(K, 6)``).

  Returns:
    list of ``B`` float32 arrays holding only the ``num_valid`` real rows.
  """
  boxes = np.asarray(out["boxes"], np.float32)
  scores = np.asarray(out["scores"], np.float32)
  classes = np.asarray(out["classes"])
  nv = np.asarray(out["num_valid"])
  idx = np.asarray(out["indices"])
  pred_np = None if pred is None else np.asarray(pred).astype(np.float32)
  rows = []
  for bi in range(boxes.shape[0]):
    k = int(nv[bi])
    cols = [boxes[bi, :k]]
    if pred_np is not None:
      p = pred_np[bi, idx[bi, :k]]
      cols += [p[:, 4:5], p[:, 5:].max(axis=1, keepdims=True)]
    else:
      cols += [scores[bi, :k, None]]
    cols += [classes[bi, :k, None].astype(np.float32)]
    rows.append(np.concatenate(cols, axis=1).astype(np.float32))
  return rows
