"""Conv gradients alone, XLA:CPU against matmul formulations, at the full-size Darknet's shapes (issue 18).

::

    python experiments/conv_grad_micro.py [--what kernel|input] [--batch 4] [--shrink 1]

``kernel``: ∂L/∂W by XLA (``jax.vjp`` of ``lax.conv_general_dilated``) against one
matmul per tap (:func:`asff_jax.models.conv_grad.kernel_grad_by_taps`, the
formulation ``conv_grad`` uses) — the table that sets ``conv_grad``'s ``'auto'``
rule. ``input``: ∂L/∂x of the stride-2 3×3 convs by XLA against the four phases
of the transposed conv as one matmul each (tried, slower: not used). Median of 5
jitted calls each; prints the relative difference of the results too (and exits
1 if it exceeds 1e-4). ``--shrink N`` divides every spatial size by N (smoke runs). Results:
``experiments/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from asff_jax.models.conv_grad import kernel_grad_by_taps  # noqa: E402  pylint: disable=wrong-import-position

DN = ("NHWC", "HWIO", "NHWC")
KERNEL_CASES = [(208, 32, 64, 3, 1), (208, 64, 32, 1, 1), (104, 64, 128, 3, 1), (104, 128, 64, 1, 1),
                (52, 128, 256, 3, 1), (52, 256, 128, 1, 1), (26, 256, 512, 3, 1), (13, 512, 1024, 3, 1),
                (208, 64, 128, 3, 2)]
INPUT_CASES = [(416, 32, 64), (208, 64, 128), (104, 128, 256), (52, 256, 512), (26, 512, 1024), (13, 256, 256)]


def conv(x, w, s, p):
  return lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN)


def kernel_xla(x, w, g, s, p):
  return jax.vjp(lambda w_: conv(x, w_, s, p), w)[1](g)[0]


def kernel_taps(x, w, g, s, p):
  return kernel_grad_by_taps(x, g, w.shape[:2], (s, s), ((p, p), (p, p)))


def input_xla(x, w, g, s, p):
  return jax.vjp(lambda x_: conv(x_, w, s, p), x)[1](g)[0]


def input_phases(x, w, g, s, p):
  """∂L/∂x as s² phases: phase (a, b) of the padded input gathers the taps i ≡ a, j ≡ b (mod s)."""
  kh, kw, ci, _ = w.shape
  b_, ho, wo, _ = g.shape
  h, w_ = x.shape[1:3]
  hp, wp = h + 2 * p, w_ + 2 * p
  mh, mw = -(-hp // s), -(-wp // s)
  rows = []
  for a in range(s):
    row = []
    for b in range(s):
      gs, ws = [], []
      for i in range(a, kh, s):
        for j in range(b, kw, s):
          d, e = (i - a) // s, (j - b) // s
          gs.append(jnp.pad(g, ((0, 0), (d, max(0, mh - d - ho)), (e, max(0, mw - e - wo)), (0, 0)))[:, :mh, :mw])
          ws.append(w[i, j].T)
      row.append(jnp.einsum("bmnc,ci->bmni", jnp.concatenate(gs, -1), jnp.concatenate(ws, 0)))
    rows.append(jnp.stack(row, 3))
  dxp = jnp.stack(rows, 2).reshape(b_, mh * s, mw * s, ci)[:, :hp, :wp]
  return dxp[:, p:p + h, p:p + w_]


def bench(f, *args, n=5):
  f = jax.jit(f, static_argnums=(3, 4))
  out = f(*args)
  out.block_until_ready()
  times = []
  for _ in range(n):
    t = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--what", choices=["kernel", "input"], default="kernel")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--shrink", type=int, default=1)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  cases = KERNEL_CASES if args.what == "kernel" else [(h, ci, co, 3, 2) for h, ci, co in INPUT_CASES]
  fa, fb, names = ((kernel_xla, kernel_taps, "per tap") if args.what == "kernel"
                   else (input_xla, input_phases, "phases"))
  worst = 0.0
  for h, ci, co, k, s in cases:
    h = max(h // args.shrink, 3)
    p = (k - 1) // 2
    ho = (h + 2 * p - k) // s + 1
    x = jnp.asarray(rng.standard_normal((args.batch, h, h, ci)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, ci, co)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.standard_normal((args.batch, ho, ho, co)), jnp.float32)
    ta, ra = bench(fa, x, w, g, s, p)
    tb, rb = bench(fb, x, w, g, s, p)
    err = float(jnp.abs(ra - rb).max() / jnp.abs(ra).max())
    worst = max(worst, err)
    print(f"{h} px {k}x{k} s{s} {ci}->{co}: XLA {ta * 1e3:7.1f} ms  {names} {tb * 1e3:7.1f} ms  "
          f"({ta / tb:.2f}x)  max rel diff {err:.1e}", flush=True)
  return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main())
