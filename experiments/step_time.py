"""Time a config's real training step: ``python experiments/step_time.py CONFIG [key=value ...]``.

The step is :func:`asff_jax.training.step.train_step` as ``asff_jax.train`` compiles it (the config's
optimizer, schedule, EMA, DropBlock setting), on 20 batches of the config's own input pipeline made
beforehand, so the input pipeline is not in the time (it prints the pipeline's own time per batch
too). Prints one ``RESULT`` line: the first step's time (compilation), three timings of 20 steps
(ms per step) and the loss after 26 steps (equal losses = the same arithmetic). Overrides are
``key=value`` pairs of the config (``dataset.input_size=224``). Used for the XLA-flag table in
``experiments/benchmarks.md``: ``XLA_FLAGS=--xla_cpu_use_onednn=true python experiments/step_time.py
configs/default.py``.
"""

from __future__ import annotations

import sys
import time

from asff_jax import cli  # noqa: F401  (first: quiets TensorFlow)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from asff_jax import config as config_lib  # noqa: E402
from asff_jax.data import loader  # noqa: E402
from asff_jax.models import create_model, losses  # noqa: E402
from asff_jax.training import optim, sharding as shd  # noqa: E402
from asff_jax.training.state import create_train_state  # noqa: E402
from asff_jax.training.step import dropblock_for_step, make_train_step_fn  # noqa: E402


def setup(config_path: str, overrides=(), devices=None):
  """The config (``key=value`` overrides applied, resolved against its dataset), its train source,
  a mesh over ``devices`` (default all), the model, the optimizer and the input shape — as
  ``asff_jax.train`` builds them. Shared with ``steps_per_dispatch.py``."""
  config = config_lib.load_config_file(config_path)
  for kv in overrides:
    key, value = kv.split("=", 1)
    *path, last = key.split(".")
    node = config
    for p in path:
      node = node[p]
    old = node[last]
    node[last] = value if isinstance(old, str) else type(old)(eval(value))  # noqa: S307 (lab script)
  source = loader.train_source(config)
  config = config_lib.resolve_config(config, **loader.dataset_info(source))
  mesh = shd.make_mesh(devices)
  size = int(config.dataset.input_size)
  model = create_model(config)
  shape = (1, size, size, 3)
  params_shape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
  opt = optim.make_optimizer(config, params_shape)
  return config, source, mesh, model, opt, shape


def main(argv) -> int:
  if not argv:
    print(__doc__)
    return 2
  config, source, mesh, model, opt, shape = setup(argv[0], argv[1:])
  state = create_train_state(model, opt.tx, jax.random.key(0), shape, sharding=shd.replicated(mesh),
                             use_ema=float(config.optimizer.ema_decay) > 0)
  step_fn = make_train_step_fn(model=model, config=config, tx=opt.tx, lr_fn=opt.lr_fn,
                               loss_fn=losses.loss_fn, mesh=mesh)
  it = loader.make_train_iterator(config, 0, source=source)
  batches = [shd.make_global_batch(next(it), mesh, int(config.batch_size)) for _ in range(20)]
  t = time.perf_counter()
  for _ in range(50):
    next(it)
  pipeline_ms = 1e3 * (time.perf_counter() - t) / 50
  dropblock = dropblock_for_step(config, 0)
  t = time.perf_counter()
  state, metrics = step_fn(state, batches[0], dropblock)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  for i in range(5):
    state, metrics = step_fn(state, batches[i], dropblock)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(3):
    t = time.perf_counter()
    for b in batches:
      state, metrics = step_fn(state, b, dropblock)
    jax.block_until_ready(metrics)
    times.append(1e3 * (time.perf_counter() - t) / len(batches))
  print(f"RESULT compile {compile_s:.1f} s  step ms {' '.join(f'{x:.1f}' for x in times)}  "
        f"loss {float(metrics['loss']):.4f}  input pipeline alone {pipeline_ms:.1f} ms per batch", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
