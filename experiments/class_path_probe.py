"""How fast can the detector's layers learn the object class? Crop classification read at each depth.

::

    python experiments/class_path_probe.py [--config configs/default.py] \\
        --readout backbone|neck|fused|adapted|head [--fusion asff] [--steps 150] \\
        [--batch 32] [--crop_size 96] [--lr 2e-3] [--freeze_dcn] [--zero_offsets] [--seed 0]

A diagnostic for issue 5 (``experiments/default_config.md``): the full
detector (``--config``'s model, ``--fusion`` overriding ``model.fusion``) is
trained from scratch as a *classifier of object crops* of the training split
(:func:`asff_jax.pretrain.extract_crops`: square crops of every box with 1.5–4×
context, resized to ``--crop_size``), and the class is read at one depth:

* ``backbone`` / ``neck`` / ``fused`` / ``adapted``: a dense layer on the
  concatenated central cells (:func:`asff_jax.pretrain.center_pool`) of C3–C5,
  the neck's outputs, the fusion outputs (head inputs), or the DCN-adapted
  features of the three levels;
* ``head``: the detector's own class logits — the central cells of each level's
  prediction conv, averaged over the four slots and the three levels (no extra
  layer).

Softmax cross-entropy, AdamW (``--lr``, weight decay 5e-4), BatchNorm in
training mode. Prints the training accuracy averaged over the last 25 steps
every 25 steps and writes nothing. Since every readout sees the same crops, the
curves compare how quickly class information becomes linearly readable at each
depth when everything is learned from scratch. ``--freeze_dcn`` keeps the DCN
kernels at their initial values; ``--zero_offsets`` starts the offset convs at
zero (the DCN then starts as a plain 3×3 conv).

Not part of the paper or the official code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from asff_jax import pretrain, train  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.data import loader  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.data.transforms import normalize_jax  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.models import create_model  # noqa: E402  pylint: disable=wrong-import-position

READOUTS = ("backbone", "neck", "fused", "adapted", "head")


def _features(readout, out, inter):
  """``(B, D)`` central-cell features of the chosen depth (not for ``head``)."""
  if readout == "backbone":
    maps = inter["backbone"]["__call__"][0]
  elif readout == "neck":
    maps = jax.tree.leaves(inter["neck"]["__call__"][0])
  elif readout == "fused":
    maps = [lv["head_input"] for lv in out["levels"]]
  else:
    maps = [lv["adapted"] for lv in out["levels"]]
  return jnp.concatenate([pretrain.center_pool(m.astype(jnp.float32)) for m in maps], -1)


def _head_logits(out, num_classes):
  """The detector's class logits at the central cells, mean over slots and levels: ``(B, C)``."""
  per_level = []
  for lv in out["levels"]:
    r = lv["raw"]
    b, h, w, _ = r.shape
    cls = r.reshape(b, h, w, 4, 5 + num_classes)[..., 5:].reshape(b, h, w, 4 * num_classes)
    per_level.append(pretrain.center_pool(cls).reshape(b, 4, num_classes).mean(1))
  return sum(per_level) / len(per_level)


def run(config, *, readout: str, steps: int, batch: int, crop_size: int, lr: float, seed: int = 0,
        freeze_dcn: bool = False, zero_offsets: bool = False, source=None, crops_images: int = 3000,
        log=print) -> list[float]:
  """Trains the readout; returns the per-step training accuracies.

  Raises:
    ValueError: unknown ``readout``, or a crop size that is not a multiple of 32.
  """
  if readout not in READOUTS:
    raise ValueError(f"--readout must be one of {READOUTS}, got {readout!r}")
  if crop_size % 32:
    raise ValueError(f"--crop_size must be a multiple of 32, got {crop_size}")
  source = loader.train_source(config) if source is None else source
  crops, classes = pretrain.extract_crops(source, crop_size=crop_size, num_images=crops_images,
                                          context_min=1.5, context_max=4.0, seed=seed,
                                          log=lambda s: None)
  nc = int(config.model.num_classes)
  model = create_model(config)
  x0 = jnp.zeros((1, crop_size, crop_size, 3))
  v = model.init(jax.random.key(seed), x0, train=False)
  mparams = v["params"]
  if zero_offsets:
    mparams = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if "conv_offset" in jax.tree_util.keystr(p) else a, mparams)
  params = {"model": mparams}
  dense = nn.Dense(nc)
  if readout != "head":
    out0, st0 = model.apply(v, x0, train=False, capture_intermediates=True, mutable=["intermediates"])
    params["dense"] = dense.init(jax.random.key(seed + 1), _features(readout, out0, st0["intermediates"]))
  tx = optax.adamw(lr, weight_decay=5e-4)
  opt = tx.init(params)

  def loss_fn(p, stats, x, y):
    out, upd = model.apply({"params": p["model"], "batch_stats": stats}, normalize_jax(x), train=True,
                           mutable=["batch_stats", "intermediates"], capture_intermediates=readout in ("backbone", "neck"))
    if readout == "head":
      logits = _head_logits(out, nc)
    else:
      logits = dense.apply(p["dense"], _features(readout, out, upd.get("intermediates", {})))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (upd["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))

  @jax.jit
  def step(p, stats, opt, x, y):
    (_, (stats, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, stats, x, y)
    u, opt = tx.update(g, opt, p)
    if freeze_dcn:
      u = jax.tree_util.tree_map_with_path(
          lambda q, a: jnp.zeros_like(a) if "dconv" in jax.tree_util.keystr(q) else a, u)
    return optax.apply_updates(p, u), stats, opt, acc

  rng = np.random.default_rng(seed)
  stats, accs, t0 = v["batch_stats"], [], time.time()
  for i in range(steps):
    idx = rng.choice(len(crops), batch)
    params, stats, opt, acc = step(params, stats, opt, crops[idx], classes[idx])
    accs.append(float(acc))
    if (i + 1) % 25 == 0 or i + 1 == steps:
      log(f"{readout} step {i + 1}/{steps}: train accuracy (last 25 steps) "
          f"{np.mean(accs[-25:]):.3f} ({time.time() - t0:.0f} s)")
  return accs


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
  p.add_argument("--readout", required=True, choices=READOUTS)
  p.add_argument("--fusion", default=None)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--crop_size", type=int, default=96)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--freeze_dcn", action="store_true")
  p.add_argument("--zero_offsets", action="store_true")
  args = p.parse_args(argv)
  config = train.resolve_config(train.load_config_file(args.config))
  if args.fusion:
    config.model.fusion = args.fusion
  run(config, readout=args.readout, steps=args.steps, batch=args.batch, crop_size=args.crop_size,
      lr=args.lr, seed=args.seed, freeze_dcn=args.freeze_dcn, zero_offsets=args.zero_offsets)
  return 0


if __name__ == "__main__":
  sys.exit(main())
