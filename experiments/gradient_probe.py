"""The paper's gradient-consistency argument (§3.3, Eq. 3–6) measured during training.

::

    python experiments/gradient_probe.py --out experiments/gradient_probe \\
        [--config configs/default.py] [--variants sum,concat,asff] [--steps 300] \\
        [--probe_every 100] [--probe_batch 16] [--workdir_root /tmp/gradient_probe]

For each fusion variant, trains ``--config`` (default: the built-in digits
config) with ``model.fusion`` set to the variant for ``--steps`` steps (same
seed, same data, checkpoints every ``--probe_every`` steps), then runs
:func:`asff_jax.tools.probes.decompose_gradients` on one fixed training batch (the
same images and labels for every variant) at the initial weights and at every
checkpoint. Writes to ``--out``:

* ``results.csv``: one row per (variant, step, level n): positives, the gradient
  share of each path l, the cosine between the own-level contribution and the
  sum of the others, the fraction of positive cells in conflict (cosine < 0),
  and for ASFF the learned weights (w_self = α/β/γ of level n at its own
  positives; w_to_l = the weight level l gives x^{n→l} there);
* ``results.md``: the same as a markdown table, with the command and the time taken;
* ``conflict.png``: conflict fraction and mean cosine over training, per level and variant.

How the numbers map to the paper is in ``experiments/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from asff_jax import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax import train  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.data import loader  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.models import create_model  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.tools import probes  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.training import checkpoints  # noqa: E402  pylint: disable=wrong-import-position

LEVEL_NAMES = ("l0 (stride 32)", "l1 (stride 16)", "l2 (stride 8)")


def variant_config(base_path: str, fusion: str, steps: int, probe_every: int):
  c = config_lib.load_config_file(base_path)
  c.model.fusion = fusion
  c.num_train_steps = steps
  c.checkpoint_every_steps = probe_every
  c.keep_checkpoints = steps // probe_every + 1
  c.eval_every_steps = 0
  c.eval_at_end = False
  c.log_every_steps = max(probe_every // 2, 1)
  return config_lib.resolve_config(c, **loader.dataset_info(loader.train_source(c)))


def probe_batch(config, size: int):
  """The fixed probe batch: the first ``size`` images of the training stream at step 0."""
  c = config.copy_and_resolve_references()
  c.batch_size = size
  batch = next(iter(loader.make_train_iterator(c, 0)))
  return np.asarray(batch["images"]), np.asarray(batch["labels"])


def probe(config, variables, images, labels) -> dict:
  model = create_model(config)
  res = probes.decompose_gradients(model, jax.device_put(variables), images, labels,
                                   loss_config=config.loss)
  return probes.summarize(jax.tree.map(np.asarray, res))


def rows_for(variant: str, step: int, summary: dict) -> list[dict]:
  rows = []
  for n, s in summary.items():
    row = {"variant": variant, "step": step, "level": n, "num_positive": s["num_positive"],
           "share_l0": s["share"][0], "share_l1": s["share"][1], "share_l2": s["share"][2],
           "cos_own_vs_others": s["cos_own_vs_others"], "conflict_frac": s["conflict_frac"],
           "w_self": s.get("w_self", float("nan"))}
    for l in range(3):
      row[f"w_to_l{l}"] = s["w_to"][l] if "w_to" in s else float("nan")
    rows.append(row)
  return rows


def write_outputs(out: str, rows: list[dict], command: str, seconds: float) -> None:
  os.makedirs(out, exist_ok=True)
  keys = list(rows[0])
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["# Gradient-consistency probe (paper §3.3, Eq. 3–6)", "",
           f"Command: `{command}`  ", f"Time on this machine: {seconds / 60:.1f} min.", "",
           "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  variants = sorted({r["variant"] for r in rows})
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
  for n in range(3):
    for v in variants:
      rr = sorted((r for r in rows if r["variant"] == v and r["level"] == n), key=lambda r: r["step"])
      steps = [r["step"] for r in rr]
      axes[0, n].plot(steps, [r["conflict_frac"] for r in rr], marker="o", label=v)
      axes[1, n].plot(steps, [r["cos_own_vs_others"] for r in rr], marker="o", label=v)
    axes[0, n].set_title(f"level {LEVEL_NAMES[n]}")
    axes[1, n].axhline(0.0, color="grey", lw=0.5)
    axes[1, n].set_xlabel("training step")
  axes[0, 0].set_ylabel("conflict fraction (cos < 0)")
  axes[1, 0].set_ylabel("cos(own, others)")
  axes[0, 0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "conflict.png"), dpi=80)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
  p.add_argument("--variants", default="sum,concat,asff")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--probe_every", type=int, default=100)
  p.add_argument("--probe_batch", type=int, default=16)
  p.add_argument("--workdir_root", default="/tmp/gradient_probe")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "gradient_probe"))
  args = p.parse_args(argv)
  logging.getLogger().setLevel(logging.INFO)  # training progress lines
  t0 = time.time()
  command = "python experiments/gradient_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
  rows = []
  images = labels = None
  for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
    config = variant_config(args.config, variant, args.steps, args.probe_every)
    if images is None:
      images, labels = probe_batch(config, args.probe_batch)
    workdir = os.path.join(args.workdir_root, variant)
    model = create_model(config)
    init = model.init(jax.random.key(int(config.seed)), images[:1], train=False)
    rows += rows_for(variant, 0, probe(config, jax.tree.map(np.asarray, dict(init)), images, labels))
    train.train_and_evaluate(config, workdir)
    for step in checkpoints.available_steps(workdir):
      variables, _ = checkpoints.load_variables(workdir, step)
      rows += rows_for(variant, step, probe(config, variables, images, labels))
      print(f"{variant} step {step}: " + "  ".join(
          f"l{r['level']} conflict {r['conflict_frac']:.2f} cos {r['cos_own_vs_others']:+.3f}"
          for r in rows[-3:]), flush=True)
  write_outputs(args.out, rows, command, time.time() - t0)
  print(f"wrote {args.out}/results.csv, results.md, conflict.png ({(time.time() - t0) / 60:.1f} min)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
