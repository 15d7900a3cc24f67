"""Gradient-consistency probes: the paper's §3.3 argument (Eq. 3–6), measured with ``jax.grad``.

The paper argues that with sum or concat fusion the gradient reaching a level's
feature x^n at an object centre mixes the positive signal from its own level
with negative (background) signals arriving through the other levels' fused
maps y^l, and that ASFF's learned weights suppress that conflict (Eq. 6).

Decomposition (paper Eq. 3–4). Each fused map y^l depends on all three neck
outputs x^0, x^1, x^2 (through the resizing x^{n→l} and the fusion), and the
loss of level l, L_l, depends only on y^l. Hence

    ∂L/∂x^n = Σ_l (∂y^l/∂x^n)ᵀ ∂L_l/∂y^l = Σ_l c^{n,l},    c^{n,l} = ∂L_l/∂x^n,

computed here by one ``jax.vjp`` per level l over (x^0, x^1, x^2). c^{n,n} is the
"own-level" contribution; Σ_{l≠n} c^{n,l} is what arrives from the other levels.

At the cells where level n has a positive (an assigned object centre, any
slot), :func:`summarize` reports, per level n:

* ``share_l``: each path's share of the gradient norm, ‖c^{n,l}‖ / Σ_l' ‖c^{n,l'}‖;
* ``cos_own_vs_others``: mean cosine between c^{n,n} and Σ_{l≠n} c^{n,l}
  (negative = the other levels push against the own-level signal: conflict);
* ``conflict_frac``: the fraction of positive cells with that cosine < 0;
* for ASFF, ``w_self``: the weight level n's fusion gives x^{n→n} there (α, β
  or γ), and ``w_to_l``: the weight level l gives x^{n→l} at the corresponding
  cell of its grid — the factors that scale the cross-level gradient in Eq. 6.

All of this runs the model in training mode (batch statistics, as during
training); batch-statistic updates are discarded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.models.config import ANCHOR_MASKS
from asff_jax.models.detector import YOLOv3
from asff_jax.models.losses import level_loss, level_loss_settings


class SplitModel:
  """The detector cut at the fusion inputs, with the model's own stages and every model option.

  ``features(images)`` → (x^0, x^1, x^2) (:meth:`YOLOv3.features`);
  ``level(l, xs)`` → (fusion dict with ``'out'`` = y^l, head dict)
  (:meth:`YOLOv3.level`). Same parameters as the full model; in training mode
  BN uses batch statistics and the updates are discarded.

  ``model`` is a :class:`~asff_jax.models.detector.YOLOv3`; ``variables`` its variables.
  """

  def __init__(self, model, variables, train: bool = True):
    self.model, self.variables, self.train = model, variables, train

  def _apply(self, *args, method):
    if self.train:
      out, _ = self.model.apply(self.variables, *args, mutable=["batch_stats"], method=method)
      return out
    return self.model.apply(self.variables, *args, method=method)

  def features(self, images):
    """``(B, H, W, 3)`` → the neck outputs (x^0, x^1, x^2) = (P5, P4, P3)."""
    return tuple(self._apply(images, self.train, method=YOLOv3.features))

  def level(self, l: int, xs):
    """Fusion and head of level l: returns (fusion dict with 'out' = y^l, head dict)."""
    return self._apply(l, xs, self.train, method=YOLOv3.level)


def decompose_gradients(model, variables, images, labels, *, loss_config=None, train: bool = True):
  """Per-path gradients c^{n,l} = ∂L_l/∂x^n at the un-resized level features.

  Args:
    model: a :class:`~asff_jax.models.detector.YOLOv3` (any fusion).
    variables: its variables.
    images: ``(B, H, W, 3)`` normalised input.
    labels: ``(B, max_boxes, 5|6)`` in input pixels (loss format).
    loss_config: ``config.loss`` (None: the official settings).
    train: run BN in training mode (default, as during training).

  Returns:
    dict with ``'contrib'``: ``contrib[n][l]`` = c^{n,l}, shape of x^n
    ``(B, H_n, W_n, C_n)`` float32; ``'level_loss'`` ``(3,)`` L_l;
    ``'positive'``: three ``(B, H_n, W_n)`` bool maps (a positive in any slot);
    ``'fusion_weights'``: three ``(B, H_l, W_l, 3)`` (ASFF) or None.
  """
  split = SplitModel(model, variables, train=train)
  xs = split.features(images)
  kw = dict(num_classes=model.num_classes, input_hw=images.shape[1:3], anchors=model.anchors,
            anchor_masks=ANCHOR_MASKS, **level_loss_settings(loss_config))
  contrib = [[None] * 3 for _ in range(3)]
  losses, positives, weights = [], [], []
  for l in range(3):
    def level_total(xs_, l=l):
      fused, head = split.level(l, xs_)
      comps, tgt = level_loss(head["raw"], head["guide_wh"], labels, level=l, return_targets=True, **kw)
      return comps["total"], (tgt.positive.any(-1), fused.get("weights"))

    loss_l, vjp, (pos, w) = jax.vjp(level_total, xs, has_aux=True)
    (grads,) = vjp(jnp.ones_like(loss_l))
    for n in range(3):
      contrib[n][l] = grads[n].astype(jnp.float32)
    losses.append(loss_l)
    positives.append(pos)
    weights.append(w)
  return {"contrib": contrib, "level_loss": jnp.stack(losses), "positive": positives,
          "fusion_weights": weights if weights[0] is not None else None, "features": xs}


def _corresponding(mask_hw_n, grid_l):
  """Indices on level l's grid of level-n cells (nearest by scaling the cell centre)."""
  hn, wn = mask_hw_n
  hl, wl = grid_l
  jj = np.minimum(((np.arange(hn) + 0.5) * hl / hn).astype(int), hl - 1)
  ii = np.minimum(((np.arange(wn) + 0.5) * wl / wn).astype(int), wl - 1)
  return jj, ii


def cell_statistics(result) -> dict:
  """The statistics of :func:`summarize`, per cell and per image, for intervals over images.

  Args:
    result: output of :func:`decompose_gradients` (numpy or jax arrays).

  Returns:
    ``{n: dict}`` per level n with, over the P positive cells of level n:
    ``'image'`` ``(P,)`` int (index in the batch), ``'share'`` ``(P, 3)``
    (‖c^{n,l}‖ / Σ_l' ‖c^{n,l'}‖), ``'cos'`` ``(P,)`` (cos(c^{n,n}, Σ_{l≠n} c^{n,l})),
    and for ASFF ``'w_self'`` ``(P,)``, ``'w_to'`` ``(P, 3)`` (as in
    :func:`summarize`) and ``'w_pos'`` ``(P, 3)`` (level n's own α/β/γ at its
    positives); plus, for ASFF, ``'w_bg_sum'`` ``(B, 3)`` and ``'bg_count'``
    ``(B,)``: per image, the sum of level n's α/β/γ over its background cells
    (no positive in any slot) and how many there are. The pooled means of
    ``share``, ``cos``, ``cos < 0``, ``w_self`` and ``w_to`` are
    :func:`summarize`'s numbers.
  """
  out = {}
  contrib = [[np.asarray(c, np.float64) for c in row] for row in result["contrib"]]
  fw = result["fusion_weights"]
  fw = [np.asarray(w, np.float64) for w in fw] if fw is not None else None
  for n in range(3):
    pos = np.asarray(result["positive"][n])
    b_idx, j_idx, i_idx = np.nonzero(pos)
    vecs = [contrib[n][l][b_idx, j_idx, i_idx] for l in range(3)]  # (P, C) each
    norms = np.stack([np.linalg.norm(v, axis=-1) for v in vecs], -1)  # (P, 3)
    own = vecs[n]
    others = sum(vecs[l] for l in range(3) if l != n)
    cos = (own * others).sum(-1) / np.maximum(np.linalg.norm(own, axis=-1) * np.linalg.norm(others, axis=-1), 1e-30)
    stats: dict[str, Any] = {"image": b_idx, "share": norms / np.maximum(norms.sum(-1, keepdims=True), 1e-30),
                             "cos": cos}
    if fw is not None:
      stats["w_self"] = fw[n][b_idx, j_idx, i_idx, n]
      stats["w_pos"] = fw[n][b_idx, j_idx, i_idx]
      w_to = []
      for l in range(3):
        jj, ii = _corresponding(pos.shape[1:], fw[l].shape[1:3])
        w_to.append(fw[l][b_idx, jj[j_idx], ii[i_idx], n])
      stats["w_to"] = np.stack(w_to, -1).reshape(len(b_idx), 3)
      bg = ~pos
      stats["w_bg_sum"] = (fw[n] * bg[..., None]).sum((1, 2))
      stats["bg_count"] = bg.sum((1, 2))
    out[n] = stats
  return out


def summarize(result) -> dict:
  """Statistics at the positive cells of each level n (see the module docstring).

  Args:
    result: output of :func:`decompose_gradients`.

  Returns:
    ``{n: {'num_positive', 'share': (3,), 'cos_own_vs_others', 'conflict_frac',
    'w_self', 'w_to': (3,)}}`` as Python floats / lists (NaN when level n has no
    positives). ``w_*`` only for ASFF.
  """
  out = {}
  for n, c in cell_statistics(result).items():
    stats: dict[str, Any] = {"num_positive": int(len(c["image"]))}
    if len(c["image"]) == 0:
      stats.update(share=[float("nan")] * 3, cos_own_vs_others=float("nan"), conflict_frac=float("nan"))
      out[n] = stats
      continue
    stats.update(share=c["share"].mean(0).tolist(), cos_own_vs_others=float(c["cos"].mean()),
                 conflict_frac=float((c["cos"] < 0).mean()))
    if "w_self" in c:
      stats["w_self"] = float(c["w_self"].mean())
      stats["w_to"] = c["w_to"].mean(0).tolist()
    out[n] = stats
  return out
