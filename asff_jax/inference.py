"""Inference glue: jitted forward + fixed-size NMS, and COCO evaluation over an eval iterator.

Used by ``asff_jax.train`` (periodic evaluation), ``asff_jax.evaluate`` and
``asff_jax.predict``. Post-processing follows the official ``postprocess``
(spec §5): score = objectness × max class probability, threshold, per-class
NMS, plus the COCO cap of ``max_detections`` per image.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.postprocess import nms_fixed


def eval_settings(config) -> dict:
  """Post-processing settings from ``config.eval`` with the official COCO-eval defaults.

  ``conf_thre`` 0.001 and ``nms_thre`` 0.65 are the official ``eval.py`` values
  (the paper says NMS 0.6); ``max_detections`` 100 is COCO's cap;
  ``pre_nms_topk`` bounds the fixed-size NMS.
  """
  ev = config.get("eval", None) if hasattr(config, "get") else None
  get = (lambda k, d: ev.get(k, d)) if ev is not None else (lambda k, d: d)
  return dict(conf_thre=float(get("conf_thre", 0.001)), nms_thre=float(get("nms_thre", 0.65)),
              pre_nms_topk=int(get("pre_nms_topk", 1000)),
              max_detections=int(get("max_detections", 100)))


def make_predict_fn(model, *, conf_thre: float, nms_thre: float, pre_nms_topk: int,
                    max_detections: int, with_fusion_maps: bool = False) -> Callable:
  """Returns ``predict(variables, images) -> dict``, jitted.

  ``images`` ``(B, S, S, 3)`` ImageNet-normalised. The dict has ``'boxes'``
  ``(B, K, 4)`` xyxy in input pixels, ``'scores'`` ``(B, K)``, ``'classes'``
  ``(B, K)`` int32, ``'num_valid'`` ``(B,)`` (K = ``max_detections``) and, with
  ``with_fusion_maps``, ``'fusion_weights'``: a list of three ``(B, H_l, W_l, 3)``
  α/β/γ maps (ASFF models only).
  """

  @jax.jit
  def predict(variables, images):
    out = model.apply(variables, images, train=False)
    res = dict(nms_fixed(out["pred"], conf_thre=conf_thre, nms_thre=nms_thre,
                         pre_nms_topk=pre_nms_topk, max_detections=max_detections))
    if with_fusion_maps and "fusion_weights" in out["levels"][0]:
      res["fusion_weights"] = [lv["fusion_weights"] for lv in out["levels"]]
    return res

  return predict


def run_coco_eval(predict: Callable, variables, batches: Iterable[Mapping[str, Any]], evaluator, *,
                  input_size: int, progress_every: int = 50, log: Callable[[str], None] = print) -> dict:
  """Runs ``predict`` over eval batches and returns the COCO metrics.

  Args:
    predict: from :func:`make_predict_fn`.
    variables: model variables.
    batches: iterable of dicts with ``'images'`` ``(B, S, S, 3)``,
      ``'image_ids'`` ``(B,)``, ``'orig_hw'`` ``(B, 2)`` (original height,
      width) and ``'valid'`` ``(B,)`` bool (False for padding rows).
    evaluator: a :class:`asff_jax.coco_eval.CocoEvaluator` (reset here).
    input_size: S, the square input side (boxes are rescaled per axis to the
      original size: the official plain resize, spec §5).

  Returns:
    ``{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR100', ..., 'num_images',
    'images_per_s'}``.
  """
  evaluator.reset()
  n, t0 = 0, time.time()
  for i, batch in enumerate(batches):
    out = jax.tree.map(np.asarray, predict(variables, jnp.asarray(batch["images"])))
    valid = np.asarray(batch["valid"], bool)
    for b in np.nonzero(valid)[0]:
      k = int(out["num_valid"][b])
      evaluator.add(int(batch["image_ids"][b]), out["boxes"][b, :k], out["scores"][b, :k],
                    out["classes"][b, :k], input_hw=(input_size, input_size),
                    orig_hw=tuple(float(v) for v in batch["orig_hw"][b]))
    n += int(valid.sum())
    if progress_every and (i + 1) % progress_every == 0:
      log(f"eval: {n} images, {n / (time.time() - t0):.1f} images/s")
  elapsed = time.time() - t0
  metrics = dict(evaluator.evaluate())
  metrics["num_images"] = n
  metrics["images_per_s"] = n / max(elapsed, 1e-9)
  return metrics
