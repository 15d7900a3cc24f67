"""The ``'synthetic'`` dataset source: small in-memory images with boxes (tests, benchmarks).

Each image is a smooth colour gradient with 1..``max_objects`` filled
rectangles and mild noise, JPEG-encoded (decoding costs about what a natural
photo of that size costs); each rectangle is a box whose class sets its
colour, so the task is learnable. Records follow the format of
:mod:`asff_jax.data.sources` (encoded ``image`` bytes, ``boxes`` xyxy in
pixels, ``classes``, ``is_crowd``, ...), and the split carries its own COCO
ground truth, so a synthetic run trains, evaluates and predicts through exactly
the code paths of a real dataset. A split is a pure function of
``(seed, split, size)``.

Config keys (``dataset.``): ``synthetic_num_train``, ``synthetic_num_val``
(images per split), ``synthetic_image_hw`` ((H, W) pixels),
``synthetic_max_objects``, ``synthetic_seed``; the class count is
``model.num_classes``.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image


class SyntheticSource(Sequence):
  """Random-access synthetic split (see the module docstring).

  Args:
    num_images: images in the split.
    height, width: image size (pixels).
    num_classes: number of classes (colours).
    seed: data seed; ``split`` is mixed in so that train and val differ.
    max_objects: at most this many boxes per image (at least one).
    split: split name (``name``/``split`` attributes; part of the seed).
    quality: JPEG quality.
  """

  def __init__(self, num_images: int = 8, *, height: int = 480, width: int = 640,
               num_classes: int = 80, seed: int = 0, max_objects: int = 7, split: str = "train",
               quality: int = 90):
    rng = np.random.default_rng([int(seed), zlib.crc32(split.encode())])
    self.name, self.split = "synthetic", split
    self.num_classes = int(num_classes)
    self.category_ids = list(range(1, num_classes + 1))
    self.class_names = [f"class_{i}" for i in range(num_classes)]
    self.report = None
    colours = np.random.default_rng([int(seed), 2**31 - 1]).uniform(0, 255, (num_classes, 3))
    self._items = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(int(num_images)):
      base = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], -1)
      img = base[..., rng.permutation(3)] * rng.uniform(0.3, 0.6)
      nb = int(rng.integers(1, max_objects + 1))
      bw = rng.uniform(0.15, 0.5, nb) * width
      bh = rng.uniform(0.15, 0.5, nb) * height
      x1 = rng.uniform(0, width - bw)
      y1 = rng.uniform(0, height - bh)
      boxes = np.stack([x1, y1, x1 + bw, y1 + bh], -1).astype(np.float32)
      classes = rng.integers(0, num_classes, nb).astype(np.int32)
      for bx, c in zip(boxes.astype(int), classes):
        img[bx[1]:bx[3], bx[0]:bx[2]] = colours[c]
      img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, "JPEG", quality=quality)
      self._items.append({
          "image": buf.getvalue(), "image_id": i + 1, "height": height, "width": width,
          "boxes": boxes, "classes": classes, "is_crowd": np.zeros(nb, bool)})

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, i):
    return self._items[int(i)]

  @property
  def eval_gt(self) -> dict:
    """The split's COCO ground truth (a dict for :class:`asff_jax.evaluation.coco_eval.CocoEvaluator`)."""
    images, anns = [], []
    for r in self._items:
      images.append({"id": r["image_id"], "width": r["width"], "height": r["height"],
                     "file_name": f"{r['image_id']:06d}.jpg"})
      for b, c in zip(r["boxes"], r["classes"]):
        w, h = float(b[2] - b[0]), float(b[3] - b[1])
        anns.append({"id": len(anns) + 1, "image_id": r["image_id"],
                     "category_id": self.category_ids[int(c)], "bbox": [float(b[0]), float(b[1]), w, h],
                     "area": w * h, "iscrowd": 0})
    cats = [{"id": i, "name": n} for i, n in zip(self.category_ids, self.class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


def open_synthetic(dataset_cfg, split: str, num_classes: int) -> SyntheticSource:
  """The synthetic ``split`` (``'train'`` or the eval split) described by ``config.dataset``."""
  n = dataset_cfg.synthetic_num_train if split == dataset_cfg.train_split else dataset_cfg.synthetic_num_val
  h, w = (int(v) for v in dataset_cfg.synthetic_image_hw)
  return SyntheticSource(int(n), height=h, width=w, num_classes=int(num_classes),
                         seed=int(dataset_cfg.synthetic_seed), max_objects=int(dataset_cfg.synthetic_max_objects),
                         split=split)
