"""The Python inference API: ``Detector`` — images in, detections out, in original-image pixels.

::

    from asff_jax import Detector
    det = Detector.from_workdir("runs/default")                  # or .from_pth(pth, config), .from_checkpoint(path, config)
    out = det(image)                                             # image: (H, W, 3) uint8 RGB numpy array
    out.boxes, out.scores, out.classes, out.class_names          # (K, 4) xyxy original pixels, (K,), (K,), K names
    outs = det([image1, image2])                                 # a list in, a list out
    maps = det.fusion_maps(image)                                # α/β/γ and the fused maps (ASFF models)

Pre- and post-processing are the official test-time ones (spec §5), exactly
what ``asff_jax.evaluate`` and ``asff_jax.predict`` use: plain bilinear resize
to the evaluation size S × S (no letterbox) and ImageNet normalisation
(:func:`asff_jax.data.transforms.val_transform`), score = objectness × class
probability, per-class NMS ``eval.nms_thre``, at most ``eval.max_detections``
per image; boxes are mapped back per axis (:func:`asff_jax.boxes.rescale_boxes`)
and clipped to the image. ``score_thre`` (default 0.3, an application
threshold; ``eval.conf_thre`` 0.001 is for COCO evaluation) drops low scores.

Images are processed in batches of ``batch_size`` (the last batch padded), so
the forward compiles once per (input size, batch size) and is reused for every
call, folder or video.

Errors: an image that is not ``(H, W, 3)`` / ``(H, W)`` / ``(H, W, 4)`` uint8 or
float in [0, 255] raises :class:`~asff_jax.errors.DataError`; a missing workdir
or checkpoint :class:`~asff_jax.errors.MissingFileError`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import jax
import numpy as np

from asff_jax import config as config_lib
from asff_jax.boxes import rescale_boxes
from asff_jax.data import loader, transforms
from asff_jax.errors import DataError
from asff_jax.evaluation import inference
from asff_jax.models import create_model
from asff_jax.models import official_weights
from asff_jax.training import checkpoints


@dataclasses.dataclass
class Detections:
  """Detections of one image, by descending score.

  Attributes:
    boxes: ``(K, 4)`` float32 ``[x1, y1, x2, y2]`` in the original image's pixels.
    scores: ``(K,)`` float32, objectness × class probability.
    classes: ``(K,)`` int32 contiguous class indices ``0..C-1``.
    class_names: K names (``dataset.class_names`` of the run, or the indices).
    category_ids: ``(K,)`` int32 dataset category ids (e.g. COCO's).
  """

  boxes: np.ndarray
  scores: np.ndarray
  classes: np.ndarray
  class_names: list
  category_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.scores)

  def to_list(self) -> list[dict]:
    """JSON-friendly rows ``{'bbox', 'score', 'class', 'class_name', 'category_id'}``."""
    return [{"bbox": [float(v) for v in b], "score": float(s), "class": int(c), "class_name": n,
             "category_id": int(k)}
            for b, s, c, n, k in zip(self.boxes, self.scores, self.classes, self.class_names,
                                     self.category_ids)]


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
  """``(H, W, 3)`` uint8 RGB from a numpy image (gray ``(H, W)``, RGBA, or float in [0, 255]).

  Raises:
    DataError: not an image array (the message says what was given).
  """
  a = np.asarray(image)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, -1)
  if a.ndim != 3 or a.shape[-1] not in (3, 4) or min(a.shape[:2]) < 1:
    raise DataError(f"{name}: expected an (H, W, 3) RGB image, got an array of shape {a.shape}")
  a = a[..., :3]
  if a.dtype != np.uint8:
    if not np.issubdtype(a.dtype, np.number):
      raise DataError(f"{name}: expected a numeric image, got dtype {a.dtype}")
    a = np.clip(np.rint(a.astype(np.float64)), 0, 255).astype(np.uint8)
  return a


class Detector:
  """A trained or converted detector ready for images (see the module docstring).

  Args:
    config: full config (``model``, ``dataset.class_names`` / ``category_ids``, ``eval``).
    variables: ``{'params', 'batch_stats'}``.
    input_size: network input side S (default: the evaluation size of the config).
    score_thre: drop detections below this score.
    batch_size: images per forward (the compiled batch shape).
  """

  def __init__(self, config, variables, *, input_size: Optional[int] = None, score_thre: float = 0.3,
               batch_size: int = 8):
    self.config = config
    self.model = create_model(config)
    self.input_size = int(input_size or loader.eval_input_size(config))
    if self.input_size % 32:
      raise config_lib.ConfigError(f"input_size must be a multiple of 32, got {self.input_size}")
    self.score_thre = float(score_thre)
    self.batch_size = int(batch_size)
    self.variables = jax.device_put(jax.tree.map(np.asarray, variables))
    n = int(config.model.num_classes)
    names = [str(v) for v in config.dataset.class_names]
    cats = [int(v) for v in config.dataset.category_ids]
    self.class_names = names if len(names) == n else [str(i) for i in range(n)]
    self.category_ids = np.asarray(cats if len(cats) == n else list(range(n)), np.int32)
    settings = inference.eval_settings(config)
    settings["conf_thre"] = min(settings["conf_thre"], self.score_thre)
    self._predict = inference.make_predict_fn(self.model, **settings)
    self._predict_maps = None
    self.has_fusion_maps = config.model.fusion == "asff"

  # -- construction ----------------------------------------------------------

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, *, use_ema: Optional[bool] = None,
                   **kwargs) -> "Detector":
    """The latest (or ``step``) checkpoint of a training or convert workdir, with its saved config."""
    config = config_lib.load_workdir_config(workdir)
    variables, _ = checkpoints.load_variables(workdir, step, use_ema=use_ema)
    return cls(config, variables, **kwargs)

  @classmethod
  def from_checkpoint(cls, path: str, config, **kwargs) -> "Detector":
    """An orbax ``state`` item (``.../checkpoints/<step>/state``) with the config that made it.

    ``config``: a config file path or a full config.
    """
    config = _config(config)
    tree = checkpoints.restore_on_one_device(os.path.abspath(path))
    return cls(config, checkpoints.variables_of(tree, float(config.optimizer.ema_decay) > 0), **kwargs)

  @classmethod
  def from_pth(cls, pth: str, config, **kwargs) -> "Detector":
    """Official PyTorch weights (``.pth``, converted on the fly; needs torch) for ``config`` (path or config)."""
    config = _config(config)
    return cls(config, official_weights.variables_from_official(official_weights.load_official_checkpoint(pth), config), **kwargs)

  # -- inference -------------------------------------------------------------

  def preprocess(self, image) -> np.ndarray:
    """``(H, W, 3)`` uint8 → ``(S, S, 3)`` float32 network input (the official ValTransform)."""
    return np.asarray(transforms.val_transform(as_rgb_uint8(image), self.input_size), np.float32)

  def _batches(self, images):
    for i in range(0, len(images), self.batch_size):
      chunk = images[i:i + self.batch_size]
      x = np.zeros((self.batch_size, self.input_size, self.input_size, 3), np.float32)
      for k, im in enumerate(chunk):
        x[k] = self.preprocess(im)
      yield chunk, x

  def _detections(self, out, b: int, hw) -> Detections:
    k = int(out["num_valid"][b])
    s = self.input_size
    boxes = rescale_boxes(out["boxes"][b, :k].astype(np.float32), (s, s), hw)
    h, w = hw
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], np.float32))
    scores = out["scores"][b, :k].astype(np.float32)
    classes = out["classes"][b, :k].astype(np.int32)
    keep = scores >= self.score_thre
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    return Detections(boxes, scores, classes, [self.class_names[c] for c in classes],
                      self.category_ids[classes])

  def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]):
    """Detections of one image (``(H, W, 3)`` array) or of each image of a list."""
    single = isinstance(images, np.ndarray) and images.ndim in (2, 3)
    items = [images] if single else [as_rgb_uint8(im, f"image {i}") for i, im in enumerate(images)]
    results = []
    for chunk, x in self._batches(items):
      out = jax.tree.map(np.asarray, self._predict(self.variables, x))
      results += [self._detections(out, b, np.asarray(im).shape[:2]) for b, im in enumerate(chunk)]
    return results[0] if single else results

  def fusion_maps(self, image) -> dict:
    """The learned fusion of one image (paper Figure 3; ASFF models).

    Returns ``{'weights': [3 × (H_l, W_l, 3)] α/β/γ per fused level (summing to 1),
    'fused_sum': [3 × (H_l, W_l)] the fused feature map summed over channels
    (the official ``vis`` output), 'detections': Detections}``; level 0 is stride 32.

    Raises:
      ConfigError: the model has no learned fusion weights (``model.fusion`` is not ``'asff'``).
    """
    if not self.has_fusion_maps:
      raise config_lib.ConfigError(f"model.fusion={self.config.model.fusion!r} has no fusion weights; "
                                   "fusion maps need an ASFF model")
    if self._predict_maps is None:
      settings = inference.eval_settings(self.config)
      settings["conf_thre"] = min(settings["conf_thre"], self.score_thre)
      self._predict_maps = inference.make_predict_fn(self.model, with_fusion_maps=True, **settings)
    im = as_rgb_uint8(image)
    (chunk, x), = list(self._batches([im]))
    out = jax.tree.map(np.asarray, self._predict_maps(self.variables, x))
    return {"weights": [w[0] for w in out["fusion_weights"]], "fused_sum": [f[0] for f in out["fused_sum"]],
            "detections": self._detections(out, 0, im.shape[:2])}


def _config(config):
  if isinstance(config, (str, os.PathLike)):
    return config_lib.load_config_file(config)
  return config_lib.merge_config(config)
