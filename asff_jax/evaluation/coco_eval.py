"""COCO bbox evaluation around pycocotools, following the official
``utils/cocoapi_evaluator.py`` (spec §5).

Conventions (official):

* Contiguous label index ``i`` (the model's class column, ``0..C-1``) maps to
  the dataset category id ``sorted(coco.getCatIds())[i]`` (for COCO the ids
  1..90 with gaps).
* Detections arrive as ``xyxy`` corners in **input pixels** (the square, or
  ``(in_h, in_w)``, network input). Evaluation preprocessing is a plain resize
  (no letterbox, aspect not kept), so boxes are mapped back to the original
  image by ``x * orig_w / in_w`` and ``y * orig_h / in_h``
  (:func:`asff_jax.boxes.rescale_boxes`), then converted to
  COCO ``[x, y, w, h]`` (top-left + size). No clipping (the official code does
  not clip).
* Score = ``obj * class_conf`` (what :mod:`asff_jax.evaluation.postprocess` returns).
* COCOeval ``iouType='bbox'`` with default parameters (10 IoU thresholds
  0.5:0.05:0.95, 101 recall points, maxDets 1/10/100, area ranges) over the
  images that were passed in (even those without detections, as the official
  evaluator collects every processed image id).
* Crowd ground truth (``iscrowd=1``) is handled by pycocotools: crowd regions
  are ignore regions (a detection matched to one is neither TP nor FP, and a
  crowd GT is never a missed GT). When the ground truth is given as a dict or a
  json path it is passed through unchanged except that missing ``iscrowd``
  (default 0), ``area`` (default ``w * h``) and ``id`` fields are filled in.

Returned metrics: ``AP`` (AP@[.5:.95]), ``AP50``, ``AP75``, ``APs``, ``APm``,
``APl``, ``AR1``, ``AR10``, ``AR100`` (``stats[8]``), ``ARs``, ``ARm``,
``ARl`` — ``COCOeval.stats`` in order. pycocotools reports ``-1`` for an entry
with no ground truth (e.g. ``APs`` when no GT is small); that is passed through.
With **no detections at all** every metric is returned as ``0.0``:
pycocotools' ``loadRes([])`` crashes (it indexes ``anns[0]``), and with no
detections the AP of every category that has GT is 0 anyway.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from asff_jax.boxes import rescale_boxes

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl")

GroundTruth = Union[COCO, str, os.PathLike, dict]


def _quiet(verbose: bool):
  return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _normalise_gt_dict(d: dict) -> dict:
  """Deep copy of a COCO instances dict with ``iscrowd``/``area``/``id`` filled in."""
  d = copy.deepcopy(d)
  for key in ("images", "categories"):
    if key not in d:
      raise ValueError(f"COCO ground truth dict needs an '{key}' list")
  anns = d.setdefault("annotations", [])
  used_ids = {a["id"] for a in anns if "id" in a}
  next_id = max(used_ids, default=0) + 1
  for a in anns:
    if "id" not in a:
      a["id"] = next_id
      next_id += 1
    a.setdefault("iscrowd", 0)
    if "area" not in a:
      a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
  return d


def load_coco_gt(gt: GroundTruth, verbose: bool = False) -> COCO:
  """A pycocotools ``COCO`` from a ``COCO`` object (used as is), a path to an
  instances json, or an instances dict (copied; see the module docstring)."""
  if isinstance(gt, COCO):
    return gt
  if isinstance(gt, (str, os.PathLike)):
    with open(gt) as f:
      gt = json.load(f)
  if not isinstance(gt, dict):
    raise TypeError(f"unsupported ground truth type {type(gt)!r}")
  coco = COCO()
  coco.dataset = _normalise_gt_dict(gt)
  with _quiet(verbose):
    coco.createIndex()
  return coco


def _py_id(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return x.item()
  return x


def _hw(size) -> tuple[float, float]:
  """``int`` (square) or ``(h, w)`` -> ``(h, w)`` floats."""
  if np.ndim(size) == 0:
    return float(size), float(size)
  h, w = size
  return float(h), float(w)


class CocoEvaluator:
  """Accumulates detections and runs pycocotools bbox COCOeval (spec §5).

  Example::

    ev = CocoEvaluator('instances_val2017.json')
    for image_id, pred in ...:
      out = nms_fixed(pred, conf_thre=0.001, nms_thre=0.65)   # (1, D, ...)
      ev.add_fixed_outputs(out, [image_id], input_hw=608)     # orig size from GT
    metrics = ev.evaluate()   # {'AP': ..., 'AP50': ..., ..., 'AR100': ...}

  Attributes:
    coco: the ground-truth ``pycocotools.coco.COCO``.
    class_ids: sorted dataset category ids; ``class_ids[i]`` is label ``i``.
    label_to_cat: dict contiguous label -> category id.
  """

  def __init__(self, gt: GroundTruth, verbose: bool = False):
    self.verbose = verbose
    self.coco = load_coco_gt(gt, verbose=verbose)
    self.class_ids = sorted(self.coco.getCatIds())
    self.label_to_cat = {i: cid for i, cid in enumerate(self.class_ids)}
    self.reset()

  @property
  def num_classes(self) -> int:
    return len(self.class_ids)

  def reset(self):
    """Forget all accumulated detections and image ids."""
    self._results: list[dict[str, Any]] = []
    self._image_ids: list[Any] = []
    self._seen: set = set()

  @property
  def image_ids(self) -> list:
    """Image ids passed in so far (evaluated even when they have no detections)."""
    return list(self._image_ids)

  def original_hw(self, image_id) -> tuple[float, float]:
    """``(height, width)`` of an image from the ground truth ``images`` entry."""
    info = self.coco.imgs[_py_id(image_id)]
    return float(info["height"]), float(info["width"])

  # -- adding detections -----------------------------------------------------

  def add(self, image_id, boxes, scores, classes, *, input_hw, orig_hw=None):
    """Add the detections of one image.

    Args:
      image_id: dataset image id (must exist in the ground truth).
      boxes: ``(K, 4)`` ``[x1, y1, x2, y2]`` in input pixels.
      scores: ``(K,)`` detection scores (``obj * class_conf``).
      classes: ``(K,)`` contiguous labels ``0..num_classes-1`` (ints or floats).
      input_hw: network input size, ``int`` (square, e.g. 608) or ``(in_h, in_w)``.
      orig_hw: original image ``(h, w)``; ``None`` reads it from the GT images.
    """
    image_id = _py_id(image_id)
    if image_id not in self.coco.imgs:
      raise KeyError(f"image id {image_id!r} is not in the ground truth")
    if image_id not in self._seen:
      self._seen.add(image_id)
      self._image_ids.append(image_id)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1)
    if not (len(boxes) == len(scores) == len(classes)):
      raise ValueError(f"boxes/scores/classes lengths differ: {len(boxes)}, {len(scores)}, {len(classes)}")
    if len(boxes) == 0:
      return
    labels = np.rint(classes).astype(np.int64)
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
    orig = self.original_hw(image_id) if orig_hw is None else _hw(orig_hw)
    xyxy = rescale_boxes(boxes, _hw(input_hw), orig)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    for bb, s, lab in zip(xywh, scores, labels):
      self._results.append({
          "image_id": image_id,
          "category_id": _py_id(self.class_ids[int(lab)]),
          "bbox": [float(v) for v in bb],
          "score": float(s),
      })

  def add_official_rows(self, image_id, rows, *, input_hw, orig_hw=None):
    """Add one image's rows ``[x1, y1, x2, y2, obj, class_conf, class_id]``
    (``postprocess_reference`` output); score = ``obj * class_conf``."""
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, 7)
    self.add(image_id, rows[:, :4], rows[:, 4] * rows[:, 5], rows[:, 6], input_hw=input_hw,
             orig_hw=orig_hw)

  def add_fixed_outputs(self, outputs, image_ids: Sequence, *, input_hw,
                        orig_hws: Optional[Sequence] = None):
    """Add a batch of :func:`asff_jax.evaluation.postprocess.nms_fixed` outputs.

    Args:
      outputs: dict with ``boxes (B, D, 4)``, ``scores (B, D)``, ``classes (B, D)``,
        ``num_valid (B,)``; only the first ``num_valid`` rows of each image count.
      image_ids: ``B`` dataset image ids.
      input_hw: network input size (``int`` or ``(h, w)``), shared by the batch.
      orig_hws: ``B`` original ``(h, w)``; ``None`` reads them from the GT.
    """
    boxes = np.asarray(outputs["boxes"], dtype=np.float32)
    scores = np.asarray(outputs["scores"], dtype=np.float32)
    classes = np.asarray(outputs["classes"])
    num_valid = np.asarray(outputs["num_valid"]).reshape(-1)
    image_ids = list(image_ids)
    if len(image_ids) != boxes.shape[0]:
      raise ValueError(f"{len(image_ids)} image ids for a batch of {boxes.shape[0]}")
    for b, image_id in enumerate(image_ids):
      k = int(num_valid[b])
      self.add(image_id, boxes[b, :k], scores[b, :k], classes[b, :k], input_hw=input_hw,
               orig_hw=None if orig_hws is None else orig_hws[b])

  # -- results ---------------------------------------------------------------

  def results(self) -> list[dict[str, Any]]:
    """COCO results list: ``{image_id, category_id, bbox [x, y, w, h], score}``
    in original-image pixels (a copy)."""
    return copy.deepcopy(self._results)

  def write_results(self, path) -> Path:
    """Write the COCO results json (the format accepted by ``COCO.loadRes`` and
    the COCO test-dev server); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
      json.dump(self._results, f)
    return path

  def add_results_json(self, path) -> None:
    """Add the detections of a results json written by :meth:`write_results`
    (original-image pixels, COCO ``[x, y, w, h]``). Only images with a
    detection become known this way: pass ``image_ids`` to :meth:`evaluate` to
    include the images that had none (e.g. the whole split).

    Raises:
      FileNotFoundError: no such file. ValueError: an entry lacks ``image_id``,
        ``category_id``, ``bbox`` or ``score``, or names an image not in the GT.
    """
    with open(path) as f:
      rows = json.load(f)
    known = set(self.coco.getImgIds())
    for i, r in enumerate(rows):
      missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
      if missing:
        raise ValueError(f"{path}: entry {i} lacks {missing}")
      if r["image_id"] not in known:
        raise ValueError(f"{path}: entry {i} names image {r['image_id']!r}, not in the ground truth")
      self._results.append({k: r[k] for k in ("image_id", "category_id", "bbox", "score")})
      if r["image_id"] not in self._seen:
        self._seen.add(r["image_id"])
        self._image_ids.append(r["image_id"])

  def per_class(self) -> list[dict[str, Any]]:
    """Per-category AP of the last (per-category) :meth:`evaluate`, as pycocotools accumulates it.

    From ``COCOeval.eval['precision']`` (T IoU thresholds × R recall points ×
    K categories × A areas × M max-dets): a category's AP is the mean of its
    precision over IoU 0.50:0.95 and all recall points (area 'all',
    100 detections), skipping the −1 entries; AP50 uses IoU 0.50 alone; −1
    when the category has no ground truth. Averaging the APs over categories
    with ground truth gives the summary AP.

    Returns:
      ``[{'category_id', 'name', 'AP', 'AP50', 'num_gt'}, ...]`` in category-id
      order ([] before any evaluation or with no detections).
    """
    ev = self.last_eval
    if ev is None or not ev.params.useCats:
      return []
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    m = len(ev.params.maxDets) - 1
    out = []
    for k, cat_id in enumerate(ev.params.catIds):
      p = precision[:, :, k, 0, m]
      p50 = precision[0, :, k, 0, m]
      num_gt = len(self.coco.getAnnIds(imgIds=ev.params.imgIds, catIds=[cat_id], iscrowd=False))
      out.append({"category_id": _py_id(cat_id), "name": self.coco.cats[cat_id].get("name", str(cat_id)),
                  "AP": float(p[p > -1].mean()) if (p > -1).any() else -1.0,
                  "AP50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0,
                  "num_gt": int(num_gt)})
    return out

  def evaluate(self, image_ids: Optional[Iterable] = None, *,
               class_agnostic: bool = False) -> dict[str, float]:
    """Run COCOeval (bbox) and return the metric dict (see module docstring).

    Args:
      image_ids: images to evaluate; default: every image passed to ``add*``
        (or, when none was, every image of the ground truth).
      class_agnostic: pycocotools' ``params.useCats = 0``: a detection may
        match ground truth of any category (localisation quality alone; not a
        COCO metric, used to separate localisation from classification).
    """
    if image_ids is None:
      image_ids = self._image_ids or sorted(self.coco.getImgIds())
    image_ids = [_py_id(i) for i in image_ids]
    id_set = set(image_ids)
    dets = [r for r in self._results if r["image_id"] in id_set]
    if not dets or not image_ids:
      # pycocotools' loadRes([]) raises IndexError; no detections -> AP 0.
      self.last_eval = None
      return {name: 0.0 for name in STAT_NAMES}
    with _quiet(self.verbose):
      coco_dt = self.coco.loadRes(copy.deepcopy(dets))
      ev = COCOeval(self.coco, coco_dt, iouType="bbox")
      ev.params.imgIds = image_ids
      if class_agnostic:
        ev.params.useCats = 0
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    self.last_eval = ev
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def evaluate_fixed_outputs(gt: Union[GroundTruth, CocoEvaluator], outputs, image_ids: Sequence, *,
                           input_hw, orig_hws: Optional[Sequence] = None,
                           results_json=None) -> dict[str, float]:
  """One-shot evaluation of :func:`asff_jax.evaluation.postprocess.nms_fixed` outputs.

  Args:
    gt: ground truth (``COCO``, json path, dict) or an existing evaluator (its
      accumulated detections are kept and evaluated too).
    outputs: batched ``nms_fixed`` dict (``B`` images) or a list of such dicts;
      ``image_ids`` is then the flat list over all of them, in order.
    image_ids: dataset image ids, one per image.
    input_hw: network input size (``int`` or ``(h, w)``).
    orig_hws: optional original ``(h, w)`` per image (default: from the GT).
    results_json: optional path to also write the results json.

  Returns:
    the metric dict of :meth:`CocoEvaluator.evaluate`.
  """
  ev = gt if isinstance(gt, CocoEvaluator) else CocoEvaluator(gt)
  batches = outputs if isinstance(outputs, (list, tuple)) else [outputs]
  image_ids = list(image_ids)
  start = 0
  for out in batches:
    b = int(np.asarray(out["num_valid"]).reshape(-1).shape[0])
    ev.add_fixed_outputs(out, image_ids[start:start + b], input_hw=input_hw,
                         orig_hws=None if orig_hws is None else list(orig_hws)[start:start + b])
    start += b
  if start != len(image_ids):
    raise ValueError(f"{len(image_ids)} image ids for {start} images")
  if results_json is not None:
    ev.write_results(results_json)
  return ev.evaluate()
