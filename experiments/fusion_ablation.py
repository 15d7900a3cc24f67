"""The paper's Table 3 (and Table 2) on the built-in dataset: one config key varied, same recipe, several seeds.

::

    python experiments/fusion_ablation.py --out experiments/fusion_ablation \\
        [--config configs/digits_aug.py] [--fusions none,concat,sum,asff] [--seeds 0,1,2] \\
        [--workdir_root /tmp/fusion_ablation] [--steps N] [--time_repeats 10] [--report_only]
    # Table 2 (adjacent ignore regions): any config key, values as Python literals
    python experiments/fusion_ablation.py --out experiments/adjacent_ignore \\
        --vary loss.adjacent_ignore_eps=None,0.0,0.2,0.5 --seeds 0,1,2 --workdir_root /tmp/adjacent_ignore

For each value and seed, trains ``--config`` with the varied key (by default
``model.fusion`` over ``--fusions``) and ``seed`` set (the data is the same;
the seed changes the initialisation and the batch order) in
``WORKDIR_ROOT/<run>`` — ``<value>_s<seed>`` for ``model.fusion`` (e.g.
``asff_s0``), ``<key leaf>=<value>_s<seed>`` for any other key (e.g.
``adjacent_ignore_eps=0.2_s0``). A finished run (its final COCO evaluation on
file) is not trained again, an interrupted one resumes; the final COCO metrics
of the val split are read from it. Each finished run also writes
``OUT/runs/<run>.csv`` (its metrics, steps and the training wall time of the
invocation that finished it — only the resumed part for a resumed run, NaN for
a run found finished in its workdir); a run whose CSV is
there with the same number of steps is not trained again, so the table can be
filled over several sittings or machines (copy the CSVs). ``--report_only``
trains nothing: it writes the table from the runs on file and lists the
missing ones.

For ``model.fusion`` the inference time of each fusion is measured on this
machine with random weights at the evaluation size, batch 1, timed interleaved
with the ``none`` baseline (median and interquartile range of the per-round
ratios; the shared CPU's clock drifts);
other keys leave the model, hence the time, unchanged. Writes ``results.csv``
(one row per run) and ``results.md`` (mean ± std over seeds of AP, AP50, AP75,
APs, APm, APl, the class-agnostic AP and AP50 — the same detections with every
category merged, i.e. localisation alone — and the relative inference time,
with the command and the wall time) and the paired differences per seed (same
seed = same initialisation and batch order) with their mean and a 95 %
t-interval over seeds, and a plain verdict: "better" only where the interval
excludes 0. The pairs: ASFF − sum and ASFF − none for ``model.fusion``, every
value − the first value otherwise (``--pairs a-b,...`` to choose).

``--config`` defaults to ``configs/digits_aug.py``, the recipe every table on file was made with (the
default of that time: official geometric augmentation, 6,500 steps, tested at 256 px); pass
``--config configs/default.py`` for today's default. On this machine one ``configs/digits_aug.py`` run
takes 19–34 minutes depending on
the load (2026-12-07); the default 4 fusions × 3 seeds took 4.9 hours of training. What was run, and the
superseded 2026-11-24/25 table (``--seeds 0,1 --steps 500``, an older recipe),
is in ``experiments/README.md``.
"""

from __future__ import annotations

import argparse
import ast
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


FUSION_KEY = "model.fusion"


def parse_value(text: str):
  """A ``--vary`` value: a Python literal (``None``, ``0.2``, ``True``, ``'x'``) or else the bare string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def run_name(key: str, value, seed: int) -> str:
  """``<value>_s<seed>`` for ``model.fusion`` (e.g. ``asff_s0``), ``<key leaf>=<value>_s<seed>`` otherwise."""
  label = str(value)
  return f"{label}_s{seed}" if key == FUSION_KEY else f"{key.rsplit('.', 1)[-1]}={label}_s{seed}"


def run_config(base_path: str, key: str, value, seed: int, steps=None):
  """``base_path``'s config with ``key`` set to ``value``, ``seed`` set, periodic evaluation off, final on."""
  c = config_lib.load_config_file(base_path)
  c.update_from_flattened_dict({key: value})  # ml_collections checks the type (an int for a float key is accepted)
  c.seed = int(seed)
  if steps:
    c.num_train_steps = int(steps)
  c.eval_every_steps = 0
  c.eval_at_end = True
  return c


def final_metrics(workdir: str, steps: int, size: int):
  """The final val metrics of a finished run evaluated at ``size`` px, or None.

  A record of another size (the run's checkpoint evaluated again with ``python -m asff_jax.evaluate
  --config.eval.input_size=S``, which writes the same file) is not the run's own evaluation.
  """
  path = os.path.join(workdir, "eval", "val_metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    m = json.load(f)
  ok = int(m.get("tag", -1)) == int(steps) and int(m.get("input_size", size)) == int(size)
  return m if ok else None


def relative_times(base_path: str, fusions, repeats: int) -> dict:
  """Eval-forward time of each fusion / the ``none`` baseline, batch 1: ``{fusion: (median, q25, q75)}``.

  Each round times every fusion once, back to back; the ratios are per round (to the round's ``none``)
  and summarised by their median and interquartile range over ``repeats`` rounds.
  """
  fns = {}
  for fusion in set(fusions) | {"none"}:
    c = run_config(base_path, FUSION_KEY, fusion, 0)
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
  base = np.array(times["none"])
  ratios = {k: np.array(t) / base for k, t in times.items()}  # per round: the clock drifts between rounds
  return {k: tuple(float(q) for q in np.percentile(r, [50, 25, 75])) for k, r in ratios.items()}


def paired_difference(rows: list[dict], a: str, b: str, metric: str, confidence: float = 0.95):
  """Per-seed ``metric(a) − metric(b)`` over the seeds both fusions ran, their mean and t-interval.

  Returns ``None`` without a common seed, else ``{'seeds', 'diffs', 'mean', 'low', 'high'}``;
  with one seed the interval is ``(nan, nan)``.
  """
  va = {r["seed"]: float(r[metric]) for r in rows if r["variant"] == a}
  vb = {r["seed"]: float(r[metric]) for r in rows if r["variant"] == b}
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


def default_pairs(key: str, variants: list[str]) -> list[tuple[str, str]]:
  """ASFF − sum and ASFF − none for ``model.fusion``; every value − the first value otherwise."""
  if key == FUSION_KEY:
    return [(a, b) for a, b in (("asff", "sum"), ("asff", "none")) if {a, b} <= set(variants)]
  return [(v, variants[0]) for v in variants[1:]]


def write_outputs(out: str, rows: list[dict], rel_time: dict, command: str, seconds: float, *,
                  key: str = FUSION_KEY, pairs=None, missing=(), report_only: bool = False) -> None:
  """``OUT/results.csv`` (one row per run) and ``OUT/results.md`` (the table, the paired differences).

  The table's training time per run is the mean (min–max) of the runs' ``train_s`` that are known
  (NaN for a run found finished in its workdir rather than trained by this script).
  """
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  title = ("Fusion ablation on the built-in dataset (paper Table 3)" if key == FUSION_KEY
           else f"`{key}` on the built-in dataset")
  took = (f"Wall time of this command: {seconds / 3600:.2f} h." if not report_only else
          f"Wall time of this command: {seconds / 60:.1f} min (report only: it trained nothing; "
          "each run's own training time is in the table).")
  lines = [f"# {title}", "", f"Command: `{command}`  ", took, ""]
  if missing:
    lines += [f"Not run yet (absent from this table): {', '.join(missing)}.", ""]
  lines += [f"| {key} | seeds | " + " | ".join(METRICS) + " | relative inference time (IQR) | training min/run |",
            "|---|---|" + "---|" * (len(METRICS) + 2)]
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  for variant in variants:
    rr = [r for r in rows if r["variant"] == variant]
    cells = []
    for k in METRICS:
      v = np.array([r[k] for r in rr], np.float64)
      cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}")
    t = rel_time.get(variant)  # (median, q25, q75) from relative_times
    t_cell = "–" if t is None else f"{t[0]:.3f} ({t[1]:.3f}–{t[2]:.3f})"
    train_min = [r["train_s"] / 60 for r in rr if np.isfinite(r["train_s"])]
    lines.append(f"| {variant} | {len(rr)} | " + " | ".join(cells) + f" | {t_cell} | "
                 + (f"{np.mean(train_min):.1f} ({min(train_min):.1f}–{max(train_min):.1f})" if train_min else "–")
                 + " |")
  pairs = [(a, b) for a, b in (default_pairs(key, variants) if pairs is None else pairs)
           if {a, b} <= set(variants)]
  if pairs:
    lines += ["", "Paired differences (same seed), mean and 95 % t-interval over seeds:", "",
              "| difference | metric | per seed | mean | 95 % interval | reading |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
      for k in ("AP", "AP50", "AP50_agnostic"):
        d = paired_difference(rows, a, b, k)
        if d is None:
          continue
        per_seed = ", ".join(f"{s}: {v:+.3f}" for s, v in zip(d["seeds"], d["diffs"]))
        lines.append(f"| {a} − {b} | {k} | {per_seed} | {d['mean']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | "
                     f"{verdict(d, a, b)} |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def run_csv(out: str, name: str) -> str:
  """``OUT/runs/<run>.csv`` (``name`` from :func:`run_name`)."""
  return os.path.join(out, "runs", f"{name}.csv")


def read_run(out: str, name: str, steps: int):
  """The row of a finished run from its CSV (same number of steps), or None.

  CSVs written before ``--vary`` existed name the value in a ``fusion`` column; they read the same.
  """
  path = run_csv(out, name)
  if not os.path.exists(path):
    return None
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if len(rows) != 1 or int(rows[0]["steps"]) != int(steps):
    return None
  r = rows[0]
  return {"variant": r.get("variant", r.get("fusion")), "seed": int(r["seed"]), "steps": int(r["steps"]),
          **{k: float(r[k]) for k in METRICS}, "train_s": float(r["train_s"])}


def write_run(out: str, name: str, row: dict) -> None:
  """``row`` to ``OUT/runs/<name>.csv``, atomically (a temporary file, then a rename)."""
  path = run_csv(out, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(row))
    w.writeheader()
    w.writerow(row)
  os.replace(tmp, path)


def parse_pairs(text: str) -> list[tuple[str, str]]:
  """``'asff-sum,asff-none'`` → ``[('asff', 'sum'), ('asff', 'none')]``."""
  pairs = []
  for item in filter(None, (x.strip() for x in text.split(","))):
    a, sep, b = item.partition("-")
    if not sep or not a or not b:
      raise SystemExit(f"--pairs: {item!r} is not of the form A-B")
    pairs.append((a, b))
  return pairs


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs", "digits_aug.py"))
  p.add_argument("--fusions", default="none,concat,sum,asff", help="the values of model.fusion (without --vary)")
  p.add_argument("--vary", default=None, help="KEY=V1,V2,...: vary this config key instead of model.fusion")
  p.add_argument("--pairs", default=None, help="A-B,...: the paired differences to report (values as named)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=None, help="override num_train_steps")
  p.add_argument("--time_repeats", type=int, default=10)
  p.add_argument("--workdir_root", default="/tmp/fusion_ablation")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "fusion_ablation"))
  p.add_argument("--report_only", action="store_true", help="train nothing: the table from the runs on file")
  args = p.parse_args(argv)
  logging.getLogger().setLevel(logging.INFO)
  t0 = time.time()
  command = "python experiments/fusion_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
  if args.vary:
    key, sep, values = args.vary.partition("=")
    if not sep or not key.strip() or not values.strip():
      raise SystemExit(f"--vary: {args.vary!r} is not of the form KEY=V1,V2,...")
    key = key.strip()
  else:
    key, values = FUSION_KEY, args.fusions
  values = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  rows, missing = [], []
  for value in values:
    for seed in seeds:
      config = run_config(args.config, key, value, seed, args.steps)
      name = run_name(key, value, seed)
      workdir = os.path.join(args.workdir_root, name)
      steps = int(config_lib.resolve_config(config, **loader.dataset_info(loader.train_source(config))).num_train_steps)
      row = read_run(args.out, name, steps)
      if row is None:
        t_run, train_s = time.time(), float("nan")  # NaN: found finished, trained elsewhere
        m = final_metrics(workdir, steps, eval_input_size(config))
        if m is None and args.report_only:
          missing.append(name)
          continue
        if m is None:
          train.train_and_evaluate(config, workdir)
          train_s = time.time() - t_run
          m = final_metrics(workdir, steps, eval_input_size(config))
        if m is None:  # e.g. SIGTERM: the run saved a checkpoint and stopped before its final evaluation
          raise SystemExit(f"{workdir}: stopped before its final evaluation (interrupted?); the same "
                           "command resumes it")
        row = {"variant": str(value), "seed": seed, "steps": steps,
               **{k: float(m.get(k, float("nan"))) for k in METRICS}, "train_s": train_s}
        write_run(args.out, name, row)
      rows.append(row)
      print(f"{name}: " + "  ".join(f"{k} {row[k]:.3f}" for k in METRICS), flush=True)
  if not rows:
    raise SystemExit(f"no finished run under {args.out}/runs or {args.workdir_root} (missing: {', '.join(missing)})")
  rel = relative_times(args.config, [str(v) for v in values], args.time_repeats) if key == FUSION_KEY else {}
  write_outputs(args.out, rows, rel, command, time.time() - t0, key=key,
                pairs=parse_pairs(args.pairs) if args.pairs else None, missing=missing,
                report_only=args.report_only)
  print(f"wrote {args.out}/results.csv, results.md ({(time.time() - t0) / 60:.1f} min)"
        + (f"; not run yet: {', '.join(missing)}" if missing else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
