"""How far apart can 8-device and 1-device training be? ``python experiments/sharding_rounding.py``.

The lab behind the bounds in ``tests/test_distributed.py`` (record: ``experiments/distributed.md``).
On ``configs/tiny.py`` at batch 8 it computes the gradient of the official loss
(:func:`asff_jax.models.losses.loss_fn`, BN in training mode) at two states — the initialisation and
after two 1-device training steps — five ways:

* on a 1-device mesh (the reference);
* on an 8-device mesh (SyncBN and the gradient all-reduce by XLA; the batch split 8 ways);
* on 1 device with every parameter multiplied by ``1 + 1e-7`` (a rounding-level perturbation);
* as the mean of 8 one-image gradients (what per-device, unsynchronised BN would give);
* as image 0's gradient alone (what one device would apply without the gradient all-reduce);

and prints, for each, the L2 norm of the gradient difference relative to the reference's norm (all
leaves together) and the worst leaf's ``max |diff| / max |reference|``. It also counts the LeakyReLU
inputs (BN outputs) that change sign between the reference and the perturbed forward pass.

Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself (before JAX starts). CPU, ~3 min.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

from pathlib import Path  # noqa: E402

from asff_jax import cli  # noqa: E402,F401  (first: quiets TensorFlow)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from asff_jax.data import loader  # noqa: E402
from asff_jax.models import losses  # noqa: E402
from asff_jax.models.layers import BatchNorm  # noqa: E402
from asff_jax.training import sharding as shd  # noqa: E402
from asff_jax.training.state import create_train_state  # noqa: E402
from asff_jax.training.step import make_train_step_fn  # noqa: E402

import step_time  # noqa: E402  (experiments/step_time.py: the shared setup)

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
BATCH = 8
PERTURB = 1e-7


def _relative(ref, other) -> tuple[float, float]:
  """(||other − ref|| / ||ref|| over all leaves, (worst leaf's max |diff| / max |ref|, its path))."""
  la, lb = jax.tree.leaves(ref), jax.tree.leaves(other)
  num = sum(float(np.sum((np.float64(x) - y) ** 2)) for x, y in zip(la, lb))
  den = sum(float(np.sum(np.float64(x) ** 2)) for x in la)
  worst = max((float(np.abs(x - y).max() / (np.abs(x).max() + 1e-30)), jax.tree_util.keystr(k))
              for (k, x), y in zip(jax.tree_util.tree_leaves_with_path(ref), lb))
  return (num / den) ** 0.5, worst


def main() -> int:
  # LR as tests/test_distributed.py
  config, source, mesh1, model, opt, shape = step_time.setup(
      TINY, [f"batch_size={BATCH}", "optimizer.lr=0.001"], devices=jax.devices()[:1])
  mesh8 = shd.make_mesh(jax.devices()[:8])
  state = create_train_state(model, opt.tx, jax.random.key(0), shape,
                             sharding=shd.replicated(mesh1), use_ema=False)
  step_fn = make_train_step_fn(model=model, config=config, tx=opt.tx, lr_fn=opt.lr_fn,
                               loss_fn=losses.loss_fn, mesh=mesh1)
  it = loader.make_train_iterator(config, 0, source=source)
  batches = [next(it) for _ in range(3)]
  states = [jax.tree.map(np.asarray, shd.to_host(state))]
  for b in batches[:2]:
    state, _ = step_fn(state, shd.make_global_batch(b, mesh1, BATCH), None)
    states.append(jax.tree.map(np.asarray, shd.to_host(state)))

  def loss_of(params, batch_stats, images, labels):
    return losses.loss_fn({"params": params, "batch_stats": batch_stats}, images, labels,
                          model=model, config=config, train=True)[0]
  grad_fn = jax.jit(jax.grad(loss_of))

  def on(host, mesh, perturb):
    """(params × (1 + perturb), batch_stats) of ``host`` replicated over ``mesh``."""
    st = jax.device_put(host, shd.replicated(mesh))
    return (jax.tree.map(lambda p: p * (1 + perturb), st.params) if perturb else st.params,
            st.batch_stats)

  def grad(host, batch, mesh, perturb=0.0):
    params, batch_stats = on(host, mesh, perturb)
    b = shd.make_global_batch(batch, mesh, batch["images"].shape[0])
    return jax.tree.map(np.asarray, grad_fn(params, batch_stats, b["images"], b["labels"]))

  @jax.jit
  def bn_inputs(params, batch_stats, images):
    _, st = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                        mutable=["batch_stats", "intermediates"],
                        capture_intermediates=lambda m, _: isinstance(m, BatchNorm))
    return jax.tree.leaves(st["intermediates"])

  def bn_inputs_sign(host, batch, perturb=0.0):
    params, batch_stats = on(host, mesh1, perturb)
    images = shd.make_global_batch(batch, mesh1, BATCH)["images"]
    return [np.asarray(x) > 0 for x in bn_inputs(params, batch_stats, images)]

  for name, host, batch in (("initialisation", states[0], batches[0]),
                            ("after 2 steps", states[2], batches[2])):
    ref = grad(host, batch, mesh1)
    per_image = [grad(host, jax.tree.map(lambda a, i=i: a[i:i + 1], batch), mesh1) for i in range(BATCH)]
    rows = {
        "8 devices": grad(host, batch, mesh8),
        f"1 device, params x (1 + {PERTURB:g})": grad(host, batch, mesh1, PERTURB),
        "per-device BN (mean of 8 one-image gradients)": jax.tree.map(lambda *g: sum(g) / BATCH,
                                                                       *per_image),
        "one device's shard only (no all-reduce)": per_image[0],
    }
    for label, g in rows.items():
      l2, worst = _relative(ref, g)
      print(f"RESULT {name:15s} {label:46s} gradient: L2 rel {l2:.2e}, worst leaf {worst[0]:.2e} "
            f"{worst[1]}")
    flips = sum(int(np.sum(a != b)) for a, b in zip(bn_inputs_sign(host, batch),
                                                     bn_inputs_sign(host, batch, PERTURB)))
    print(f"RESULT {name:15s} LeakyReLU inputs changing sign under the perturbation: {flips}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
