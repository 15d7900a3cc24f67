"""Backbone pre-training by object-crop classification (a stand-in for ImageNet pre-training).

The official recipe (spec §7) starts from an ImageNet-pretrained Darknet-53.
A small from-scratch run has no such start: on the built-in digits dataset the
trunk learns "object here, this big" long before digit shapes, and the 10-way
classification stays at chance for the whole 20-minute budget
(``experiments/default_config.md``). This module gives the backbone a
classification start from the training split itself, with no extra data:

1. crops: every (non-crowd) ground-truth box of the first ``crops_images``
   training images, cut out as a square around the box with a random context
   factor in ``[context_min, context_max]`` × the longer side and a random
   shift, resized to ``crop_size`` (bilinear) — objects at several scales in
   the frame, as the detector sees them;
2. a classifier: the detector's own backbone (:class:`Darknet53` at the
   config's width and depth) → average pools of C3, C4, C5 (over the whole
   map, or with ``pool='center'`` over the central cells only),
   concatenated → one dense layer to ``num_classes``; softmax cross-entropy,
   BatchNorm in training mode, AdamW (``lr``, cosine to 0), ``steps`` steps of
   ``batch_size`` crops, ImageNet normalisation as in detection;
3. the result: the backbone's ``params`` and ``batch_stats`` (the classifier
   layer is dropped), written with :mod:`flax.serialization` (msgpack) to a
   file that :func:`load_backbone` reads and ``asff_jax.train`` merges into a
   fresh model when ``model.backbone_init`` names it (or, with
   ``pretrain.steps > 0``, runs this first and saves it in the workdir).

Config (``config.pretrain``; defaults in :data:`DEFAULTS`): ``steps``,
``batch_size``, ``lr``, ``weight_decay``, ``crop_size``, ``crops_images``,
``context_min``, ``context_max``, ``seed``, ``val_crops``, ``pool``.

This is not part of the official implementation; it is a substitute for its
pretrained backbone when none is available (``configs/default.py``).

Errors: a training split without boxes raises ``ValueError``; a backbone file
that does not fit the model raises ``ValueError`` naming the file and the
first mismatching leaf.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

DEFAULTS = dict(steps=0, batch_size=64, lr=2e-3, weight_decay=5e-4, crop_size=64, crops_images=3000,
                context_min=1.1, context_max=2.5, seed=0, val_crops=500, pool="global")
POOLS = ("global", "center")


def center_pool(f):
  """Mean of the central cell(s) of ``(B, h, w, C)``: the middle one for odd ``h``/``w``, the middle
  two for even — the cells a detector's target assignment would pick for the crop's object. ``(B, C)``."""
  h, w = f.shape[1], f.shape[2]
  r0, c0 = (h - 1) // 2, (w - 1) // 2
  return jnp.mean(f[:, r0:h // 2 + 1, c0:w // 2 + 1], axis=(1, 2))
BACKBONE = "backbone"


def pretrain_settings(config) -> dict:
  """``config.pretrain`` over :data:`DEFAULTS`."""
  pc = config.get("pretrain", None)
  out = dict(DEFAULTS)
  if pc is not None:
    out.update({k: pc[k] for k in pc.keys() if k in DEFAULTS})
  return out


def extract_crops(source, *, crop_size: int, num_images: int, context_min: float, context_max: float,
                  seed: int, log: Callable[[str], None] = logging.info):
  """Square object crops of the first ``num_images`` records.

  Returns ``(crops (N, crop_size, crop_size, 3) uint8, classes (N,) int32)``.
  Crowd boxes and boxes under 2 px are skipped.

  Raises:
    ValueError: no usable box in those records.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  crops, classes = [], []
  n = min(int(num_images), len(source))
  t0 = time.time()
  for i in range(n):
    r = source[i]
    boxes, cls, crowd = r["boxes"], r["classes"], r["is_crowd"]
    if len(boxes) == 0:
      continue
    with Image.open(io.BytesIO(r["image"])) as im:
      img = im.convert("RGB")
      for b, c, cr in zip(boxes, cls, crowd):
        x1, y1, x2, y2 = (float(v) for v in b)
        side = max(x2 - x1, y2 - y1)
        if cr or side < 2:
          continue
        s = side * rng.uniform(context_min, context_max)
        cx = 0.5 * (x1 + x2) + rng.uniform(-0.15, 0.15) * side
        cy = 0.5 * (y1 + y2) + rng.uniform(-0.15, 0.15) * side
        box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
        crop = img.transform((crop_size, crop_size), Image.EXTENT, box, Image.BILINEAR,
                             fillcolor=(124, 116, 104))
        crops.append(np.asarray(crop, np.uint8))
        classes.append(int(c))
    if (i + 1) % 1000 == 0:
      log(f"pretrain: crops from {i + 1}/{n} images ({len(crops)} crops, {time.time() - t0:.0f} s)")
  if not crops:
    raise ValueError(f"pretrain: no boxes in the first {n} records of {getattr(source, 'name', source)}")
  return np.stack(crops), np.asarray(classes, np.int32)


class CropClassifier(nn.Module):
  """Backbone → pool(C3) ⊕ pool(C4) ⊕ pool(C5) → dense ``num_classes`` logits. Input ``(B, S, S, 3)`` normalised.

  ``pool``: ``'global'`` (average over all cells) or ``'center'`` (:func:`center_pool`: only the
  central cells, so the class has to be readable where a detector reads it).
  """

  width: float
  stage_blocks: tuple
  num_classes: int
  dtype: Any = jnp.float32
  pool: str = "global"

  @nn.compact
  def __call__(self, x, train: bool):
    from asff_jax.models.darknet import Darknet53  # pylint: disable=import-outside-toplevel

    feats = Darknet53(self.width, tuple(self.stage_blocks), self.dtype, name=BACKBONE)(x, train)
    if self.pool not in POOLS:
      raise ValueError(f"pretrain.pool must be one of {POOLS}, got {self.pool!r}")
    pool = center_pool if self.pool == "center" else lambda f: jnp.mean(f, axis=(1, 2))
    pooled = jnp.concatenate([pool(f.astype(jnp.float32)) for f in feats], -1)
    return nn.Dense(self.num_classes, name="classifier")(pooled)


def pretrain_backbone(config: ml_collections.ConfigDict, *, source=None,
                      log: Callable[[str], None] = logging.info) -> dict:
  """Runs the crop-classification pre-training; returns ``{'params', 'batch_stats', 'report'}``.

  ``params`` / ``batch_stats`` are the backbone's (the subtrees the detector
  keeps under ``'backbone'``); ``report`` has the train and held-out crop
  accuracy, the number of crops and the time taken.
  """
  from asff_jax.data import loader  # pylint: disable=import-outside-toplevel
  from asff_jax.data.transforms import normalize_jax  # pylint: disable=import-outside-toplevel

  s = pretrain_settings(config)
  source = source if source is not None else loader.train_source(config)
  t0 = time.time()
  crops, classes = extract_crops(source, crop_size=int(s["crop_size"]), num_images=int(s["crops_images"]),
                                 context_min=float(s["context_min"]), context_max=float(s["context_max"]),
                                 seed=int(s["seed"]), log=log)
  n_val = min(int(s["val_crops"]), len(crops) // 5)
  rng = np.random.default_rng(int(s["seed"]))
  perm = rng.permutation(len(crops))
  val_idx, tr_idx = perm[:n_val], perm[n_val:]
  log(f"pretrain: {len(tr_idx)} train / {n_val} held-out crops of {int(s['crop_size'])} px "
      f"({time.time() - t0:.0f} s)")

  mc = config.model
  model = CropClassifier(float(mc.width), tuple(mc.stage_blocks), int(mc.num_classes),
                         dtype=jnp.dtype(mc.get("dtype", "float32")), pool=str(s["pool"]))
  size = int(s["crop_size"])
  variables = model.init(jax.random.key(int(s["seed"])), jnp.zeros((1, size, size, 3)), train=False)
  steps, bs = int(s["steps"]), int(s["batch_size"])
  sched = optax.cosine_decay_schedule(float(s["lr"]), max(steps, 1))
  tx = optax.adamw(sched, weight_decay=float(s["weight_decay"]))
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, normalize_jax(x), train=True,
                                mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (upd["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))

    (loss, (new_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss, acc

  @jax.jit
  def predict(params, stats, x):
    return jnp.argmax(model.apply({"params": params, "batch_stats": stats}, normalize_jax(x), train=False), -1)

  accs = []
  t1 = time.time()
  for i in range(steps):
    idx = rng.choice(tr_idx, size=bs, replace=len(tr_idx) < bs)
    params, stats, opt_state, loss, acc = step(params, stats, opt_state, crops[idx], classes[idx])
    accs.append(acc)
    if (i + 1) % max(steps // 5, 1) == 0 or i + 1 == steps:
      log(f"pretrain: step {i + 1}/{steps} loss {float(loss):.3f} "
          f"train acc {float(np.mean(jax.device_get(accs[-20:]))):.3f} ({time.time() - t1:.0f} s)")
  val_acc = float("nan")
  if n_val:
    hits = [np.asarray(predict(params, stats, crops[val_idx[j:j + 256]])) == classes[val_idx[j:j + 256]]
            for j in range(0, n_val, 256)]
    val_acc = float(np.mean(np.concatenate(hits)))
  report = {"steps": steps, "crops": int(len(tr_idx)), "held_out_crops": int(n_val),
            "train_acc_last20": float(np.mean(jax.device_get(accs[-20:]))) if accs else float("nan"),
            "held_out_acc": val_acc, "seconds": round(time.time() - t0, 1)}
  log(f"pretrain: held-out crop accuracy {val_acc:.3f}; {report['seconds']} s in all")
  to_np = lambda t: jax.tree.map(np.asarray, t)
  return {"params": to_np(params[BACKBONE]), "batch_stats": to_np(stats[BACKBONE]), "report": report}


def save_backbone(path: str, backbone: Mapping[str, Any]) -> None:
  """Writes ``{'params', 'batch_stats'}`` of a backbone (msgpack), atomically."""
  from flax import serialization  # pylint: disable=import-outside-toplevel

  data = serialization.msgpack_serialize({"params": backbone["params"],
                                          "batch_stats": backbone["batch_stats"]})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def load_backbone(path: str) -> dict:
  """Reads a file written by :func:`save_backbone`.

  Raises:
    FileNotFoundError: missing file. ValueError: not a backbone file (names the file).
  """
  from flax import serialization  # pylint: disable=import-outside-toplevel

  with open(path, "rb") as f:
    data = f.read()
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types
    raise ValueError(f"{path}: not a backbone file ({type(e).__name__}: {e})") from e
  if not isinstance(tree, dict) or set(tree) != {"params", "batch_stats"}:
    raise ValueError(f"{path}: not a backbone file (expected keys params, batch_stats)")
  return tree


def merge_backbone(variables: Mapping[str, Any], backbone: Mapping[str, Any], path: str = "backbone") -> dict:
  """``variables`` with ``['params'|'batch_stats']['backbone']`` replaced by ``backbone``'s.

  Raises:
    ValueError: structure or a shape differs (message names ``path`` and the leaf).
  """
  out = {k: dict(v) for k, v in variables.items()}
  for col in ("params", "batch_stats"):
    want = variables[col][BACKBONE]
    got = backbone[col]
    w_leaves = jax.tree_util.tree_leaves_with_path(want)
    g_leaves = jax.tree_util.tree_leaves_with_path(got)
    if [p for p, _ in w_leaves] != [p for p, _ in g_leaves]:
      raise ValueError(f"{path}: {col} structure does not match the model's backbone "
                       f"(width/stage_blocks differ?)")
    for (p, w), (_, g) in zip(w_leaves, g_leaves):
      if tuple(np.shape(w)) != tuple(np.shape(g)):
        raise ValueError(f"{path}: {col}{jax.tree_util.keystr(p)} has shape {np.shape(g)}, "
                         f"the model needs {np.shape(w)}")
    out[col][BACKBONE] = jax.tree.map(lambda w, g: jnp.asarray(g, jnp.asarray(w).dtype), want, got)
  return out


def main(argv=None):
  """``python -m asff_jax.pretrain --config configs/X.py --out FILE``: pre-train and save a backbone."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Config file.")
  flags.DEFINE_string("out", None, "Output backbone file (.msgpack).")
  FLAGS = flags.FLAGS

  def _run(_):
    logging.getLogger().setLevel(logging.INFO)
    from asff_jax.train import resolve_config  # pylint: disable=import-outside-toplevel
    config = resolve_config(FLAGS.config)
    res = pretrain_backbone(config, log=print)
    save_backbone(FLAGS.out, res)
    print(f"saved backbone to {FLAGS.out}: {res['report']}")

  app.run(_run, argv=list(sys.argv if argv is None else argv))


if __name__ == "__main__":
  main()
