"""Does running k training steps per dispatch (``lax.scan`` over k batches) speed up the default recipe?

    python experiments/steps_per_dispatch.py [--config configs/default.py] [--k 10] [--rounds 3]

Issue 18 asked to measure this candidate: the default config's step (width 1/4, 256 px, batch 2)
is small, so per-dispatch overhead could matter. Both variants run the very same
:func:`asff_jax.training.step.train_step` on the same pre-made batches of the config's own
pipeline: A dispatches one jitted step per batch (what ``asff_jax.train`` does), B one jitted
``lax.scan`` of ``k`` steps over ``k`` stacked batches. They are timed interleaved (A B A B …,
``--rounds`` times ``k`` steps each, medians), and the script checks that B's state after its
first ``k`` steps equals A's (same steps, same batches). The result is recorded in
``experiments/benchmarks.md``; it prints one summary line.
"""

from __future__ import annotations

import argparse
import time

from asff_jax import cli  # noqa: F401  (first: quiets TensorFlow)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import os  # noqa: E402
import sys  # noqa: E402

from asff_jax import config as config_lib  # noqa: E402
from asff_jax.data import loader  # noqa: E402
from asff_jax.models import losses  # noqa: E402
from asff_jax.training import sharding as shd  # noqa: E402
from asff_jax.training.state import create_train_state  # noqa: E402
from asff_jax.training.step import dropblock_for_step, ema_warmup_for, train_step  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (experiments/step_time.py: the shared setup)


def measure(config_path: str, k: int = 10, rounds: int = 3) -> dict:
  """Times A (one step per dispatch) and B (``lax.scan`` of ``k`` steps); see the module docstring.

  Returns ``{'one_s', 'scan_s'}`` (median seconds per step), their per-round lists ``one_runs`` /
  ``scan_runs``, ``compile_one_s`` / ``compile_scan_s`` (first call, compile + k steps) and
  ``max_param_diff`` (max |params A − params B| after the first k steps, same batches).
  """
  args = argparse.Namespace(config=config_path, k=k, rounds=rounds)
  config, source, mesh, model, opt, shape = step_time.setup(args.config, devices=jax.devices()[:1])
  repl = shd.replicated(mesh)
  ema = config_lib.ema_decay(config)  # as the training loop's step

  def fresh():
    return create_train_state(model, opt.tx, jax.random.key(0), shape, sharding=repl, use_ema=ema > 0)

  it = loader.make_train_iterator(config, 0, source=source)
  host = [next(it) for _ in range(args.k)]
  batches = [jax.device_put({k: jnp.asarray(v) for k, v in b.items()}) for b in host]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  kw = dict(model=model, config=config, tx=opt.tx, lr_fn=opt.lr_fn, loss_fn=losses.loss_fn,
            dropblock=dropblock_for_step(config, 0), ema_decay=ema,
            ema_warmup_steps=ema_warmup_for(config))
  one = jax.jit(lambda s, b: train_step(s, b, **kw), donate_argnums=(0,))

  def scanned(s, bs):
    return jax.lax.scan(lambda c, b: train_step(c, b, **kw), s, bs)

  many = jax.jit(scanned, donate_argnums=(0,))

  t = time.perf_counter()
  sa = fresh()
  for b in batches:
    sa, _ = one(sa, b)
  jax.block_until_ready(sa)
  compile_a = time.perf_counter() - t
  t = time.perf_counter()
  sb, _ = many(fresh(), stacked)
  jax.block_until_ready(sb)
  compile_b = time.perf_counter() - t
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)))

  ta, tb = [], []
  for _ in range(args.rounds):
    t = time.perf_counter()
    for b in batches:
      sa, _ = one(sa, b)
    jax.block_until_ready(sa)
    ta.append((time.perf_counter() - t) / args.k)
    t = time.perf_counter()
    sb, _ = many(sb, stacked)
    jax.block_until_ready(sb)
    tb.append((time.perf_counter() - t) / args.k)
  return {"one_s": float(np.median(ta)), "scan_s": float(np.median(tb)), "one_runs": ta, "scan_runs": tb,
          "compile_one_s": compile_a, "compile_scan_s": compile_b, "max_param_diff": diff}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--k", type=int, default=10, help="steps per dispatch in the scanned variant")
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args(argv)
  r = measure(args.config, args.k, args.rounds)
  a, b = r["one_s"], r["scan_s"]
  print(f"{args.config}: 1 step/dispatch {1e3 * a:.1f} ms/step (runs "
        f"{', '.join(f'{1e3 * x:.0f}' for x in r['one_runs'])}); {args.k} steps/dispatch (lax.scan) "
        f"{1e3 * b:.1f} ms/step (runs {', '.join(f'{1e3 * x:.0f}' for x in r['scan_runs'])}); speed-up "
        f"{a / b:.2f}x; first call (compile + {args.k} steps) {r['compile_one_s']:.0f} s vs "
        f"{r['compile_scan_s']:.0f} s; max |params A - params B| after {args.k} steps {r['max_param_diff']:.2e}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
