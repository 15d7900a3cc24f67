"""The official ASFF training loss on head outputs (spec §6), jit-compatible.

Per level (strides 32, 16, 8) the loss has these terms, each a **sum over
elements divided by the batch size B** (no normalisation by the number of
positives, all weights 1), and the levels are summed:

* ``anchor`` = Σ_anchor_mask (1 − IoU_wh(predicted guided anchor, GT wh)²),
  centre-aligned, +1e-16 in the union (official ``IOUWH_loss``);
* ``iou``    = Σ_positives tgt_scale·(1 − IoU(decoded box, GT box)²), +1e-16 in
  the union (official ``IOUloss``);
* ``xy``     = Σ tgt_scale·BCEWithLogits(raw tx, ty; in-cell offsets);
* ``wh``     = Σ tgt_scale·|raw tw, th − log(w / pw + 1e-12)|, a plain L1, with
  ``pw`` the *predicted* guided anchor of the responsible slot;
* ``l1``     = xy + wh;
* ``obj``    = Σ obj_mask·BCEWithLogits(t_obj; 1 at positives, else 0);
* ``cls``    = Σ_positives BCEWithLogits(t_cls; class targets);
* ``total``  = anchor + iou + l1 + obj + cls.

tgt_scale = 2 − w·h/(input_w·input_h) at positives (0 elsewhere). Targets are
built by :mod:`asff_jax.models.targets`. All computation is float32; boxes are in grid
units of the level (see ``targets``), which leaves every term unchanged up to
float rounding.

Official quirks reproduced
--------------------------
* **Non-detached wh targets.** ``log(w / pw + 1e-12)`` uses the predicted
  anchor ``pw = exp(guide_wh)·A`` without ``stop_gradient``, so the wh L1 also
  sends exactly ±tgt_scale/B into ``guide_wh`` at the responsible slot's w and
  h channels (parity README quirk 1). ``detach_anchor_targets=True`` applies
  ``stop_gradient`` to ``pw`` there (values unchanged, only that gradient goes).
* **Last writer wins** when two GTs of an image hit the same (level, slot,
  cell): all targets, masks and tgt_scale come from the later GT (quirk 2),
  computed deterministically with a scatter-max winner map.
* **Multi-hot classes with label smoothing off**: the official loop never
  resets the class vector, so every GT that wrote the slot keeps its class at 1
  (quirk 2). With smoothing on, the later GT's smoothed one-hot replaces it.
* **Slot-3 shape target from the later GT**: every GT at a cell writes slot 3's
  guided-anchor target, so the ``anchor`` loss of slot 3 uses the last GT at
  that cell (quirk 3).
* **Ignore before positives**: predictions with best IoU > ignore_thre to any
  GT lose their objectness term, but a positive always gets weight 1 (or its
  mixup weight) even when its own prediction was ignored (quirk 4).

Extension (off by default): ``adjacent_ignore_eps`` — the paper's adjacent
ignore regions (Sec. 3.3, Table 2), see :func:`asff_jax.models.targets.adjacent_ignore_mask`.
It only changes ``obj``.

Robustness (on by default, ``max_log_scale``; not in the official code): the
exponentials of ``tw, th`` and ``guide_wh`` are taken of inputs zeroed where no
box term looks and capped at 15 where one does. Loss and gradient are
bit-identical to the official ones below the cap; above it, where the official
gradient is NaN in every parameter (``w·h`` overflows), they are finite.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from asff_jax import boxes as box_lib
from asff_jax.config import default_loss_config
from asff_jax.models import targets as tgt_lib
from asff_jax.models.head import NUM_SLOTS
from asff_jax.models.targets import ANCHOR_MASKS, ANCHORS

COMPONENTS = ("anchor", "iou", "l1", "xy", "wh", "obj", "cls", "total")
STATS = ("num_pos", "cls_correct")
"""Counts (not losses) :func:`head_loss` also reports per level: ``num_pos`` positives
in the batch, ``cls_correct`` positives whose largest class logit is the target class."""
IOU_LOSS_EPS = 1e-16  # official IOUloss / IOUWH_loss union eps (README quirk 6)
LOG_EPS = 1e-12  # official eps inside log(w / pw + eps)
# Cap on tw, th and guide_wh inside exp() where a box or anchor term uses them
# (level_loss's max_log_scale): e^15 ≈ 3.3·10⁶ times the anchor, far outside any
# box a detector predicts, and small enough that exp(2·15)·anchor squared (an
# area) stays finite in float32.
MAX_LOG_SCALE = 15.0


def bce_with_logits(logits, targets):
  """Elementwise binary cross-entropy on logits (numerically stable form).

  ``max(x, 0) − x·t + log(1 + exp(−|x|))`` — the same value as PyTorch's
  ``BCEWithLogitsLoss(reduction='none')``; gradient ``sigmoid(x) − t``.
  """
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def level_loss(raw, guide_wh, labels, *, level: int, num_classes: int, input_hw,
               anchors=ANCHORS, anchor_masks=ANCHOR_MASKS, ignore_thre: float = 0.7,
               label_smoothing: bool = True, detach_anchor_targets: bool = False,
               adjacent_ignore_eps=None, max_log_scale: float | None = MAX_LOG_SCALE,
               return_targets: bool = False, return_stats: bool = False):
  """Official loss of one level (spec §6).

  Args:
    raw: ``(B, H, W, 4*(5+C))`` float32 prediction-conv output (NHWC), channel
      ``(5+C)*slot + c`` (c: 0,1 tx,ty; 2,3 tw,th; 4 objectness; 5.. classes).
    guide_wh: ``(B, H, W, 8)`` raw guide_wh output (log-scales, before exp).
    labels: ``(B, N, 5)`` ``[class, cx, cy, w, h]`` or ``(B, N, 6)`` with a
      mixup weight, input pixels, zero-padded at the end.
    level: 0, 1, 2 (strides 32, 16, 8). num_classes: C.
    input_hw: ``(input_h, input_w)`` in pixels (static Python ints).
    anchors: ``(9, 2)`` prior anchors in pixels; anchor_masks: per-level prior indices.
    ignore_thre: objectness ignore IoU threshold (official 0.7).
    label_smoothing: official LABAL_SMOOTH (on in the official cfg).
    detach_anchor_targets: ``stop_gradient`` on the predicted anchor inside the
      wh targets (the official code does not detach; default False).
    adjacent_ignore_eps: None (off) or float >= 0 (paper Table 2 ignore regions).
    max_log_scale: cap on the log-scales ``tw, th`` and ``guide_wh`` inside the
      exponentials of the box and anchor terms (``iou``, ``anchor`` and the
      predicted anchor ``pw`` in the ``wh`` target); the ``wh`` L1 itself sees
      the raw ``tw, th``. ``None`` or ``inf`` = no cap (official). Below the cap values and
      gradients are bit-identical to the official formulation; above it the
      term is that of the capped scale (gradient 0 through the exponential).
      Without it a single prediction whose ``w·h`` leaves float32's range
      (``tw`` ≈ 256 at a positive, in a digits run) makes the whole gradient NaN
      (0 · inf), and the training guard skips the step.
    return_targets: also return the :class:`~asff_jax.models.targets.LevelTargets`.
    return_stats: also the counts ``STATS`` (float32 scalars, not divided by B;
      with several target classes at a slot, the largest target counts).

  Returns:
    dict of float32 scalars with keys ``COMPONENTS`` (each already divided by B)
    [+ ``STATS``];
    with ``return_targets`` a pair ``(dict, LevelTargets)``.

  Raises:
    ValueError: inconsistent shapes (grid·stride ≠ input, channels, labels) or
      negative ``adjacent_ignore_eps``.
  """
  raw = jnp.asarray(raw, jnp.float32)
  guide_wh = jnp.asarray(guide_wh, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  if raw.shape[-1] != 4 * (5 + num_classes):
    raise ValueError(f"raw has {raw.shape[-1]} channels, expected 4*(5+{num_classes})")
  dec = tgt_lib.decode_level(raw, guide_wh, level=level, input_hw=input_hw,
                             anchors=anchors, anchor_masks=anchor_masks)
  t = tgt_lib.assign_level(labels, dec, level=level, num_classes=num_classes,
                           input_hw=input_hw, anchors=anchors, anchor_masks=anchor_masks,
                           ignore_thre=ignore_thre, label_smoothing=label_smoothing,
                           adjacent_ignore_eps=adjacent_ignore_eps)
  batch = raw.shape[0]
  out = dec["out"]
  pos = t.positive
  # Finite gradients (a robustness fix; see ``max_log_scale``): tw/th and
  # guide_wh at positions no box term selects are unconstrained, and a large
  # value there overflows exp() to inf. jnp.where would then pass 0 · inf = NaN
  # back (the official code, multiplying by tgt_mask, has the same hazard). So
  # the exponentials are taken of inputs zeroed where the terms are masked out,
  # and, where a term does look, of inputs capped at ``max_log_scale``.
  sel = (pos | t.anchor_mask)[..., None]
  b_, h_, w_ = raw.shape[:3]
  g_sel = guide_wh.reshape(b_, h_, w_, NUM_SLOTS, 2)
  twh_sel = out[..., 2:4]
  if max_log_scale is not None:
    g_sel = jnp.minimum(g_sel, max_log_scale)
    twh_sel = jnp.minimum(twh_sel, max_log_scale)
  g_safe = jnp.where(sel, g_sel, 0.0)
  out_safe = out.at[..., 2:4].set(jnp.where(sel, twh_sel, 0.0))
  safe = tgt_lib.decode_level(out_safe.reshape(raw.shape), g_safe.reshape(guide_wh.shape),
                              level=level, input_hw=input_hw, anchors=anchors,
                              anchor_masks=anchor_masks)
  anchor_wh, box = safe["anchor_wh"], safe["box"]

  iou_wh = box_lib.wh_iou(anchor_wh, t.anchor_target_wh, eps=IOU_LOSS_EPS)
  l_anchor = jnp.sum(jnp.where(t.anchor_mask, 1.0 - iou_wh ** 2, 0.0))

  iou = box_lib.elementwise_iou_xywh(box, t.box_target, eps=IOU_LOSS_EPS)
  l_iou = jnp.sum(jnp.where(pos, t.tgt_scale * (1.0 - iou ** 2), 0.0))

  l_xy = jnp.sum(t.tgt_scale[..., None] * bce_with_logits(out[..., 0:2], t.xy_target))

  pw = jax.lax.stop_gradient(anchor_wh) if detach_anchor_targets else anchor_wh
  gt_wh = t.box_target[..., 2:4]
  wh_target = jnp.where(pos[..., None], jnp.log(gt_wh / pw + LOG_EPS), 0.0)
  l_wh = jnp.sum(t.tgt_scale[..., None] * jnp.abs(out[..., 2:4] - wh_target))

  l_obj = jnp.sum(t.obj_mask * bce_with_logits(out[..., 4], pos.astype(jnp.float32)))
  l_cls = jnp.sum(jnp.where(t.cls_mask[..., None], bce_with_logits(out[..., 5:], t.cls_target), 0.0))

  comp = dict(anchor=l_anchor, iou=l_iou, xy=l_xy, wh=l_wh, obj=l_obj, cls=l_cls)
  comp = {k: v / batch for k, v in comp.items()}
  comp["l1"] = comp["xy"] + comp["wh"]
  comp["total"] = comp["anchor"] + comp["iou"] + comp["l1"] + comp["obj"] + comp["cls"]
  comp = {k: comp[k] for k in COMPONENTS}
  if return_stats:
    hit = jnp.argmax(out[..., 5:], -1) == jnp.argmax(t.cls_target, -1)
    comp["num_pos"] = jnp.sum(pos).astype(jnp.float32)
    comp["cls_correct"] = jnp.sum(pos & hit).astype(jnp.float32)
  return (comp, t) if return_targets else comp


def level_loss_settings(loss_config=None) -> dict:
  """The :func:`level_loss` keyword settings of a ``config.loss`` section (None: the official ones)."""
  c = default_loss_config() if loss_config is None else loss_config
  return dict(label_smoothing=bool(c["label_smoothing"]), ignore_thre=float(c["ignore_thre"]),
              detach_anchor_targets=bool(c["detach_anchor_targets"]),
              adjacent_ignore_eps=c["adjacent_ignore_eps"],
              max_log_scale=c.get("max_log_scale", MAX_LOG_SCALE))


def head_loss(levels: Sequence[Mapping[str, jax.Array]], labels, *, loss_config=None,
              num_classes: int = 80, input_hw, anchors=ANCHORS, anchor_masks=ANCHOR_MASKS):
  """Official total loss over the 3 levels (spec §6), jit-compatible.

  Args:
    levels: 3 dicts (levels 0, 1, 2 = strides 32, 16, 8) with ``'raw'``
      ``(B, H, W, 4*(5+C))`` and ``'guide_wh'`` ``(B, H, W, 8)``.
    labels: ``(B, N, 5|6)`` input pixels (see :func:`level_loss`).
    loss_config: a ``config.loss`` section (:func:`asff_jax.config.default_loss_config`;
      None = the official settings). Values must be static Python values.
    num_classes: C. input_hw: ``(input_h, input_w)`` pixels.

  Returns:
    ``(total, aux)``: ``total`` a float32 scalar (sum over levels); ``aux`` maps
    each of ``COMPONENTS`` and ``STATS`` to a ``(3,)`` float32 array (per level).

  Raises:
    ValueError: not exactly 3 levels, or see :func:`level_loss`.
  """
  if len(levels) != 3:
    raise ValueError(f"expected 3 levels, got {len(levels)}")
  c = default_loss_config() if loss_config is None else loss_config
  kw = level_loss_settings(c)
  per = [level_loss(lv["raw"], lv["guide_wh"], labels, level=l, num_classes=num_classes,
                    input_hw=input_hw, anchors=anchors, anchor_masks=anchor_masks,
                    return_stats=True, **kw)
         for l, lv in enumerate(levels)]
  aux = {k: jnp.stack([p[k] for p in per]) for k in COMPONENTS + STATS}
  weights = {k: float(c[f"{k}_weight"]) for k in ("anchor", "iou", "l1", "obj", "cls")}
  if all(w == 1.0 for w in weights.values()):
    total = jnp.sum(aux["total"])  # official: the plain sum
  else:
    total = sum(w * jnp.sum(aux[k]) for k, w in weights.items())
  return total, aux


def loss_fn(variables, images, labels, *, model, config, train: bool = True, rng=None,
            dropblock=None):
  """Runs the detector and returns the official loss: the entry point for training and probes.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}``.
    images: ``(B, H, W, 3)`` float, ImageNet-normalised (H, W multiples of 32).
    labels: ``(B, max_boxes, 5)`` ``[class, cx, cy, w, h]`` in input pixels,
      zero rows at the end, or ``(B, max_boxes, 6)`` with a per-box mixup weight.
    model: the module from :func:`asff_jax.models.create_model`.
    config: full config (its ``loss`` section is used). Static Python values.
    train: batch statistics in BN (official training mode) and DropBlock.
    rng: PRNG key for DropBlock (needed only when ``dropblock`` is active).
    dropblock: None or three ``(block_size, keep_prob)`` (schedule, spec §7).

  Returns:
    ``(loss, aux)``: ``loss`` float32 scalar = Σ levels (anchor + iou + l1 + obj
    + cls) / B; ``aux`` maps ``'anchor', 'iou', 'l1', 'xy', 'wh', 'obj', 'cls',
    'total'`` and the counts ``STATS`` to ``(3,)`` per-level arrays (level 0 = stride 32), and
    ``'batch_stats'`` to the updated statistics (unchanged when ``train=False``).
  """
  rngs = {"dropblock": rng} if rng is not None else None
  if train:
    out, updates = model.apply(variables, images, train=True, dropblock=dropblock,
                               mutable=["batch_stats"], rngs=rngs)
    batch_stats = updates["batch_stats"]
  else:
    out = model.apply(variables, images, train=False)
    batch_stats = variables.get("batch_stats", {})
  total, aux = head_loss(out["levels"], labels, loss_config=config.loss,
                         num_classes=model.num_classes, input_hw=images.shape[1:3],
                         anchors=model.anchors)
  aux = dict(aux)
  aux["batch_stats"] = batch_stats
  return total, aux
