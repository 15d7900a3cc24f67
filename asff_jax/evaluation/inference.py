"""Inference: the jitted forward with fixed-size NMS, and the COCO evaluation loop over batches.

Post-processing follows the official ``postprocess`` (spec §5): score =
objectness × max class probability, threshold, per-class NMS, plus the COCO
cap of ``max_detections`` per image. Used by periodic and command-line
evaluation (:mod:`asff_jax.evaluation.evaluator`), prediction and the Python
API (:mod:`asff_jax.tools.detector`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.evaluation.postprocess import nms_fixed


def eval_settings(config) -> dict:
  """Post-processing settings of ``config.eval`` (official: ``conf_thre`` 0.001, ``nms_thre`` 0.65).

  Returns ``{'conf_thre', 'nms_thre', 'pre_nms_topk', 'max_detections'}``
  (keyword arguments of :func:`make_predict_fn`).
  """
  e = config.eval
  return dict(conf_thre=float(e.conf_thre), nms_thre=float(e.nms_thre),
              pre_nms_topk=int(e.pre_nms_topk), max_detections=int(e.max_detections))


def make_predict_fn(model, *, conf_thre: float, nms_thre: float, pre_nms_topk: int,
                    max_detections: int, with_fusion_maps: bool = False) -> Callable:
  """Returns ``predict(variables, images) -> dict``, jitted (one compilation per input shape).

  ``images`` ``(B, S, S, 3)`` ImageNet-normalised. The dict has ``'boxes'``
  ``(B, K, 4)`` xyxy in input pixels, ``'scores'`` ``(B, K)``, ``'classes'``
  ``(B, K)`` int32, ``'num_valid'`` ``(B,)`` (K = ``max_detections``) and, with
  ``with_fusion_maps`` (ASFF models), ``'fusion_weights'`` and ``'fused_sum'``:
  lists over the three levels of ``(B, H_l, W_l, 3)`` α/β/γ maps and
  ``(B, H_l, W_l)`` channel-summed fused features.
  """

  @jax.jit
  def predict(variables, images):
    out = model.apply(variables, images, train=False)
    res = dict(nms_fixed(out["pred"], conf_thre=conf_thre, nms_thre=nms_thre,
                         pre_nms_topk=pre_nms_topk, max_detections=max_detections))
    if with_fusion_maps and "fusion_weights" in out["levels"][0]:
      res["fusion_weights"] = [lv["fusion_weights"] for lv in out["levels"]]
      res["fused_sum"] = [lv["fused_sum"] for lv in out["levels"]]
    return res

  return predict


def run_coco_eval(predict: Callable, variables, batches: Iterable[Mapping[str, Any]], evaluator, *,
                  input_size: int, progress: Callable[[int], None] = lambda n: None,
                  compute_metrics: bool = True) -> dict:
  """Runs ``predict`` over eval batches and returns the COCO metrics.

  Args:
    predict: from :func:`make_predict_fn`.
    variables: model variables.
    batches: iterable of dicts with ``'images'`` ``(B, S, S, 3)``,
      ``'image_ids'`` ``(B,)``, ``'orig_hw'`` ``(B, 2)`` (original height,
      width) and ``'valid'`` ``(B,)`` bool (False for padding rows).
    evaluator: a :class:`asff_jax.evaluation.coco_eval.CocoEvaluator` (reset here).
    input_size: S, the square input side (boxes are rescaled per axis to the
      original size: the official plain resize, spec §5).
    progress: called with the number of images done after every batch.
    compute_metrics: False collects the detections only (images-only splits
      such as COCO test-dev: the metrics are then absent).

  Returns:
    ``{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100', ..., 'num_images',
    'images_per_s'}``.
  """
  evaluator.reset()
  n, t0 = 0, time.time()
  for batch in batches:
    out = jax.tree.map(np.asarray, predict(variables, jnp.asarray(batch["images"])))
    valid = np.asarray(batch["valid"], bool)
    for b in np.nonzero(valid)[0]:
      k = int(out["num_valid"][b])
      evaluator.add(int(batch["image_ids"][b]), out["boxes"][b, :k], out["scores"][b, :k],
                    out["classes"][b, :k], input_hw=(input_size, input_size),
                    orig_hw=tuple(float(v) for v in batch["orig_hw"][b]))
    n += int(valid.sum())
    progress(n)
  elapsed = time.time() - t0
  metrics = dict(evaluator.evaluate()) if compute_metrics else {}
  metrics["num_images"] = n
  metrics["images_per_s"] = n / max(elapsed, 1e-9)
  return metrics
