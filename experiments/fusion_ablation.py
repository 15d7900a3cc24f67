"""The paper's Table 3 on the built-in dataset: none / concat / sum / asff fusion, same recipe, several seeds.

::

    python experiments/fusion_ablation.py --out experiments/fusion_ablation \\
        [--config configs/default.py] [--fusions none,concat,sum,asff] [--seeds 0,1,2] \\
        [--workdir_root /tmp/fusion_ablation] [--steps N] [--time_repeats 10]

For each fusion and seed, trains ``--config`` with ``model.fusion`` and
``seed`` set (the data is the same; the seed changes the initialisation and the
batch order) in ``WORKDIR_ROOT/<fusion>_s<seed>`` — a finished run (its final
COCO evaluation on file) is not trained again, an interrupted one resumes —
and reads the final COCO metrics of the val split. Each finished run also
writes ``OUT/runs/<fusion>_s<seed>.csv`` (its metrics, steps and wall time);
a run whose CSV is there with the same number of steps is not trained again,
so the table can be filled over several sittings or machines (copy the CSVs).
The inference time of each
fusion is measured on this machine with random weights at the evaluation size,
batch 1, timed interleaved with the ``none`` baseline (ratio of medians; the
shared CPU's clock drifts). Writes ``results.csv`` (one row per run) and
``results.md`` (mean ± std over seeds of AP, AP50, AP75, APs, APm, APl, the
class-agnostic AP and AP50 — the same detections with every category merged,
i.e. localisation alone — and the relative inference time, with the command
and the wall time) and, for ASFF − sum and ASFF − none, the paired difference
per seed (same seed = same initialisation and batch order) with its mean and a
95 % t-interval over seeds, and a plain verdict: "ASFF is better" only where
the interval excludes 0.

On this machine one ``configs/default.py`` run takes 19–23 minutes, so the
default 4 fusions × 3 seeds take about 4.5 hours; the checked-in results
(``experiments/fusion_ablation/``, ``experiments/README.md``) are the superseded
2026-11-24/25 table (``--seeds 0,1 --steps 500``, an older recipe, 1.5 hours).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from asff_jax import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax import train  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.data import loader  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.data.loader import eval_input_size  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.models import create_model, random_variables  # noqa: E402  pylint: disable=wrong-import-position

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP_agnostic", "AP50_agnostic")


def run_config(base_path: str, fusion: str, seed: int, steps=None):
  c = config_lib.load_config_file(base_path)
  c.model.fusion = fusion
  c.seed = int(seed)
  if steps:
    c.num_train_steps = int(steps)
  c.eval_every_steps = 0
  c.eval_at_end = True
  return c


def final_metrics(workdir: str, steps: int):
  """The final val metrics of a finished run, or None."""
  path = os.path.join(workdir, "eval", "val_metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    m = json.load(f)
  return m if int(m.get("tag", -1)) == int(steps) else None


def relative_times(base_path: str, fusions, repeats: int) -> dict:
  """Eval-forward time of each fusion / the ``none`` baseline (interleaved medians), batch 1."""
  fns = {}
  for fusion in set(fusions) | {"none"}:
    c = run_config(base_path, fusion, 0)
    size = eval_input_size(c)
    model = create_model(c)
    variables = jax.device_put(random_variables(model, (size, size)))
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    f = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False)["pred"])
    jax.block_until_ready(f(variables, x))
    fns[fusion] = (f, variables, x)
  times = {k: [] for k in fns}
  for _ in range(max(int(repeats), 1)):
    for k, (f, v, x) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(v, x))
      times[k].append(time.perf_counter() - t0)
  base = float(np.median(times["none"]))
  return {k: float(np.median(t)) / base for k, t in times.items()}


def paired_difference(rows: list[dict], a: str, b: str, metric: str, confidence: float = 0.95):
  """Per-seed ``metric(a) − metric(b)`` over the seeds both fusions ran, their mean and t-interval.

  Returns ``None`` without a common seed, else ``{'seeds', 'diffs', 'mean', 'low', 'high'}``;
  with one seed the interval is ``(nan, nan)``.
  """
  va = {r["seed"]: float(r[metric]) for r in rows if r["fusion"] == a}
  vb = {r["seed"]: float(r[metric]) for r in rows if r["fusion"] == b}
  seeds = sorted(set(va) & set(vb))
  if not seeds:
    return None
  d = np.array([va[s] - vb[s] for s in seeds], np.float64)
  mean = float(d.mean())
  if len(d) < 2:
    low = high = float("nan")
  else:
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    low, high = mean - half, mean + half
  return {"seeds": seeds, "diffs": d.tolist(), "mean": mean, "low": low, "high": high}


def verdict(diff: dict, a: str, b: str) -> str:
  """A plain reading of :func:`paired_difference`: better, worse, or not resolved at 95 %."""
  if len(diff["seeds"]) < 2:
    return f"one seed: no interval, {a} − {b} = {diff['mean']:+.3f}"
  if diff["low"] > 0:
    return f"{a} is better than {b}"
  if diff["high"] < 0:
    return f"{a} is worse than {b}"
  return f"not resolved: the interval includes 0"


def write_outputs(out: str, rows: list[dict], rel_time: dict, command: str, seconds: float) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  lines = ["# Fusion ablation on the built-in dataset (paper Table 3)", "",
           f"Command: `{command}`  ", f"Wall time on this machine: {seconds / 3600:.2f} h.", "",
           "| fusion | seeds | " + " | ".join(METRICS) + " | relative inference time |",
           "|---|---|" + "---|" * (len(METRICS) + 1)]
  for fusion in dict.fromkeys(r["fusion"] for r in rows):
    rr = [r for r in rows if r["fusion"] == fusion]
    cells = []
    for k in METRICS:
      v = np.array([r[k] for r in rr], np.float64)
      cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}")
    lines.append(f"| {fusion} | {len(rr)} | " + " | ".join(cells) + f" | {rel_time.get(fusion, float('nan')):.3f} |")
  pairs = [(a, b) for a, b in (("asff", "sum"), ("asff", "none")) if {a, b} <= {r["fusion"] for r in rows}]
  if pairs:
    lines += ["", "Paired differences (same seed), mean and 95 % t-interval over seeds:", "",
              "| difference | metric | per seed | mean | 95 % interval | reading |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
      for k in ("AP", "AP50", "AP50_agnostic"):
        d = paired_difference(rows, a, b, k)
        per_seed = ", ".join(f"{s}: {v:+.3f}" for s, v in zip(d["seeds"], d["diffs"]))
        lines.append(f"| {a} − {b} | {k} | {per_seed} | {d['mean']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | "
                     f"{verdict(d, a, b)} |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def run_csv(out: str, fusion: str, seed: int) -> str:
  return os.path.join(out, "runs", f"{fusion}_s{seed}.csv")


def read_run(out: str, fusion: str, seed: int, steps: int):
  """The row of a finished run from its CSV (same number of steps), or None."""
  path = run_csv(out, fusion, seed)
  if not os.path.exists(path):
    return None
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if len(rows) != 1 or int(rows[0]["steps"]) != int(steps):
    return None
  r = rows[0]
  return {"fusion": r["fusion"], "seed": int(r["seed"]), "steps": int(r["steps"]),
          **{k: float(r[k]) for k in METRICS}, "train_s": float(r["train_s"])}


def write_run(out: str, row: dict) -> None:
  path = run_csv(out, row["fusion"], row["seed"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(row))
    w.writeheader()
    w.writerow(row)
  os.replace(tmp, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"))
  p.add_argument("--fusions", default="none,concat,sum,asff")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=None, help="override num_train_steps")
  p.add_argument("--time_repeats", type=int, default=10)
  p.add_argument("--workdir_root", default="/tmp/fusion_ablation")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "fusion_ablation"))
  args = p.parse_args(argv)
  logging.getLogger().setLevel(logging.INFO)
  t0 = time.time()
  command = "python experiments/fusion_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
  fusions = [f.strip() for f in args.fusions.split(",") if f.strip()]
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  rows = []
  for fusion in fusions:
    for seed in seeds:
      config = run_config(args.config, fusion, seed, args.steps)
      workdir = os.path.join(args.workdir_root, f"{fusion}_s{seed}")
      steps = int(config_lib.resolve_config(config, **loader.dataset_info(loader.train_source(config))).num_train_steps)
      row = read_run(args.out, fusion, seed, steps)
      if row is None:
        t_run = time.time()
        m = final_metrics(workdir, steps)
        if m is None:
          train.train_and_evaluate(config, workdir)
          m = final_metrics(workdir, steps)
        if m is None:
          raise RuntimeError(f"{workdir}: no final evaluation after training")
        row = {"fusion": fusion, "seed": seed, "steps": steps,
               **{k: float(m.get(k, float("nan"))) for k in METRICS}, "train_s": time.time() - t_run}
        write_run(args.out, row)
      rows.append(row)
      print(f"{fusion} seed {seed}: " + "  ".join(f"{k} {row[k]:.3f}" for k in METRICS), flush=True)
  rel = relative_times(args.config, fusions, args.time_repeats)
  write_outputs(args.out, rows, rel, command, time.time() - t0)
  print(f"wrote {args.out}/results.csv, results.md ({(time.time() - t0) / 60:.1f} min)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
