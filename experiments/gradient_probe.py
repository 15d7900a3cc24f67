"""The paper's gradient-consistency argument (§3.3, Eq. 3–6) measured along training, with intervals over images.

::

    # probe the checkpoints of finished (or running) runs, e.g. configs/digits_long.py with each fusion:
    python experiments/gradient_probe.py --runs RUN_ASFF RUN_SUM [--steps 0,1500,3000,6000,12000,24000] \\
        [--num_images 64] [--out experiments/gradient_probe]
    # or train short runs first, one per fusion, then probe them:
    python experiments/gradient_probe.py --train --config configs/digits_aug.py --variants sum,asff \\
        --train_steps 300 --probe_every 100 --workdir_root /tmp/gradient_probe

For each run (its fusion is read from the run's ``config.json``) and each
probed step, :func:`asff_jax.tools.probes.decompose_gradients` splits the
gradient at the three neck outputs x^n into the per-path terms c^{n,l} = ∂L_l/∂x^n
(paper Eq. 3, exactly, with ``jax.vjp``) on a **fixed set of training images**:
the first ``--num_images`` images of the training stream at step 0 (augmented as
in training; the same images and labels for every run that shares the
dataset). The model runs in training mode, in chunks of the run's own batch size
(so the batch statistics are those of a training step). Step 0 is the run's own
initialisation (``model.init`` with the run's seed), or its step-0 checkpoint
when it has one.

Per (run, step, level n), at the positive cells of level n: the gradient share of
each path l, cos(own, others), the conflict fraction (cos < 0) and, for ASFF,
the weights: ``w_self`` (α/β/γ that level n gives its own features at its
positives), ``w_to_l`` (the weight level l gives x^{n→l} at the corresponding
cell — the factors of Eq. 6), and level n's three weights at its positives
(``w_pos_k``) and at its background cells (``w_bg_k``). Every number is pooled
over the cells of all probe images, with a 95 % percentile-bootstrap interval
over images (``scipy.stats.bootstrap``, 2,000 resamples of the images).

``--merge CSV ...`` adds the rows of earlier ``results.csv`` files (runs probed
again here replace theirs), so runs probed at different times — a run still
training, say — end up in one table and plot; without ``--runs`` it only
re-draws them. Writes to ``--out``: ``results.csv`` (every statistic with ``_lo``/``_hi``),
``results.md`` (command, time, the main columns) and ``curves.png`` (the
quantities against training step, intervals shaded). What the paper predicts
for each and what was measured: ``experiments/README.md``.
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
from scipy import stats as scipy_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from asff_jax import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax import train  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.data import loader  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.models import create_model  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.tools import probes  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.training import checkpoints  # noqa: E402  pylint: disable=wrong-import-position

LEVEL_NAMES = ("level 0 (stride 32)", "level 1 (stride 16)", "level 2 (stride 8)")
BOOTSTRAP_RESAMPLES = 2000


def variant_config(base_path: str, fusion: str, steps: int, probe_every: int):
  """``--train`` mode: the config of the short run trained for one fusion variant."""
  c = config_lib.load_config_file(base_path)
  c.model.fusion = fusion
  c.num_train_steps = steps
  c.checkpoint_every_steps = probe_every
  c.keep_checkpoints = steps // probe_every + 1
  c.eval_every_steps = 0
  c.eval_at_end = False
  c.log_every_steps = max(probe_every // 2, 1)
  return config_lib.resolve_config(c, **loader.dataset_info(loader.train_source(c)))


def probe_images(config, size: int):
  """The fixed probe set: the first ``size`` images of ``config``'s training stream at step 0.

  Returns ``(images (size, H, W, 3) float32 normalised, labels (size, max_boxes, 5|6))``.
  """
  c = config.copy_and_resolve_references()
  c.batch_size = size
  batch = next(iter(loader.make_train_iterator(c, 0)))
  return np.asarray(batch["images"]), np.asarray(batch["labels"])


def dataset_key(config) -> tuple:
  """What must agree between runs probed on the same images: dataset, split, input size, classes."""
  d = config.dataset
  return (str(d.source), str(d.root), str(d.train_split), int(d.input_size), int(config.model.num_classes))


def initial_variables(config, model, image_shape):
  """Step 0 of a run trained by ``asff_jax.train``: ``model.init`` with the run's seed (no warm start)."""
  if config.init.checkpoint:
    raise SystemExit("gradient_probe: the run was warm-started (config.init.checkpoint); "
                     "its step 0 is not model.init — save a step-0 checkpoint or leave 0 out of --steps")
  key = jax.random.key(int(config.seed), impl=config.init_rng_impl)
  variables = jax.jit(lambda k: model.init(k, np.zeros((1, *image_shape), np.float32), train=False))(key)
  return jax.tree.map(np.asarray, dict(variables))


def _pooled(sums: np.ndarray, counts: np.ndarray, rng) -> tuple[float, float, float]:
  """Pooled mean Σsums / Σcounts over images, with a 95 % bootstrap interval over images."""
  keep = counts > 0
  sums, counts = sums[keep], counts[keep]
  if counts.sum() == 0:
    return (float("nan"),) * 3
  est = float(sums.sum() / counts.sum())
  if len(sums) < 2:
    return est, float("nan"), float("nan")
  res = scipy_stats.bootstrap((sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True,
                              vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                              confidence_level=0.95, rng=rng)
  return est, float(res.confidence_interval.low), float(res.confidence_interval.high)


def level_rows(run: str, variant: str, step: int, cells: dict, num_images: int, seed: int = 0) -> list[dict]:
  """One row per level n from the per-cell statistics of all probe images (:func:`probes.cell_statistics`)."""
  rows = []
  for n in range(3):
    c = cells[n]
    img = c["image"]
    count = np.bincount(img, minlength=num_images).astype(np.float64)
    row = {"run": run, "variant": variant, "step": step, "level": n, "probe_images": num_images,
           "num_positive": int(len(img)), "images_with_positives": int((count > 0).sum())}

    def add(name, per_cell, counts=count, sums=None):
      if sums is None:
        sums = np.bincount(img, weights=per_cell, minlength=num_images)
      rng = np.random.default_rng(seed)
      row[name], row[name + "_lo"], row[name + "_hi"] = _pooled(np.asarray(sums, np.float64), counts, rng)

    for l in range(3):
      add(f"share_l{l}", c["share"][:, l])
    add("cos_own_vs_others", c["cos"])
    add("conflict_frac", (c["cos"] < 0).astype(np.float64))
    if "w_self" in c:
      add("w_self", c["w_self"])
      for l in range(3):
        add(f"w_to_l{l}", c["w_to"][:, l])
      for k in range(3):
        add(f"w_pos_{k}", c["w_pos"][:, k])
      for k in range(3):
        add(f"w_bg_{k}", None, counts=np.asarray(c["bg_count"], np.float64), sums=c["w_bg_sum"][:, k])
    rows.append(row)
  return rows


def _concat_cells(parts: list[tuple[int, dict]]) -> dict:
  """Joins the per-chunk :func:`probes.cell_statistics` (image indices offset by the chunk start)."""
  out = {}
  for n in range(3):
    out[n] = {}
    for key in parts[0][1][n]:
      arrays = [(p[n][key] + off) if key == "image" else p[n][key] for off, p in parts]
      out[n][key] = np.concatenate(arrays, 0)
  return out


def probe_run(workdir: str, steps, images, labels, *, chunk: int = 0) -> list[dict]:
  """Rows of :func:`level_rows` for ``steps`` (None = 0 and every checkpoint) of the run in ``workdir``."""
  config = config_lib.load_workdir_config(workdir)
  model = create_model(config)
  variant = str(config.model.fusion)
  chunk = int(chunk or config.batch_size)
  if len(images) % chunk:
    raise SystemExit(f"gradient_probe: --num_images {len(images)} is not a multiple of the chunk {chunk} "
                     f"({workdir}'s batch size unless --chunk is given)")
  fn = jax.jit(lambda v, x, y: probes.decompose_gradients(model, v, x, y, loss_config=config.loss))
  available = checkpoints.available_steps(workdir)
  if steps is None:
    steps = sorted({0, *available})
  missing = [s for s in steps if s != 0 and s not in available]
  if missing:
    raise SystemExit(f"gradient_probe: {workdir} has no checkpoint at step(s) {missing} (it has {available})")
  rows = []
  for step in steps:
    t0 = time.time()
    if step == 0 and 0 not in available:
      variables = initial_variables(config, model, images.shape[1:])
    else:
      variables, _ = checkpoints.load_variables(workdir, step, use_ema=False)
    variables = jax.device_put(variables)
    parts = []
    for i in range(0, len(images) - chunk + 1, chunk):
      res = fn(variables, images[i:i + chunk], labels[i:i + chunk])
      parts.append((i, probes.cell_statistics(jax.tree.map(np.asarray, res))))
    rows += level_rows(os.path.basename(os.path.normpath(workdir)), variant, int(step), _concat_cells(parts),
                       len(images))
    print(f"{variant} step {step} ({time.time() - t0:.0f} s): " + "  ".join(
        "l{0} own {1:.2f} cos {2:+.3f} conflict {3:.2f}".format(
            r["level"], r["share_l%d" % r["level"]], r["cos_own_vs_others"], r["conflict_frac"])
        for r in rows[-3:]), flush=True)
  return rows


def write_outputs(out: str, rows: list[dict], command: str, seconds: float, num_images: int) -> None:
  """``results.csv``, ``results.md`` and ``curves.png`` under ``out``."""
  os.makedirs(out, exist_ok=True)
  keys = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, restval="")
    w.writeheader()
    w.writerows(rows)

  def ci(r, k):
    if k not in r or r[k] != r[k]:
      return "–"
    return f"{r[k]:.2f} [{r[k + '_lo']:.2f}, {r[k + '_hi']:.2f}]"

  lines = ["# Gradient-consistency probe (paper §3.3, Eq. 3–6)", "",
           f"Command: `{command}`  ", f"Time on this machine: {seconds / 60:.1f} min; {num_images} probe images; "
           "95 % bootstrap intervals over images in brackets.", "",
           "| run | fusion | step | level n | positives | own share ‖c^{n,n}‖/Σ | cos(own, others) | "
           "conflict fraction | w_self (own weight at positives) | own weight at background |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    n = r["level"]
    lines.append(f"| {r['run']} | {r['variant']} | {r['step']} | {n} | {r['num_positive']} | {ci(r, f'share_l{n}')} | "
                 f"{ci(r, 'cos_own_vs_others')} | {ci(r, 'conflict_frac')} | {ci(r, 'w_self')} | {ci(r, f'w_bg_{n}')} |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  runs = list(dict.fromkeys((r["run"], r["variant"]) for r in rows))
  panels = [("own share ‖c^{n,n}‖ / Σ_l ‖c^{n,l}‖", lambda n: f"share_l{n}"),
            ("cos(own, others)", lambda n: "cos_own_vs_others"),
            ("conflict fraction (cos < 0)", lambda n: "conflict_frac"),
            ("ASFF: own weight, positives — / background - -", None),
            ("Eq. 6: x^{n→l} weight, l=n+1 —, n+2 - -", "w_to")]
  fig, axes = plt.subplots(len(panels), 3, figsize=(14, 3.0 * len(panels)), sharex=True, squeeze=False)
  for n in range(3):
    for p, (title, key) in enumerate(panels):
      ax = axes[p, n]
      for i, (run, variant) in enumerate(runs):
        rr = sorted((r for r in rows if r["run"] == run and r["level"] == n), key=lambda r: r["step"])
        x = [r["step"] for r in rr]
        if key == "w_to":  # the two other levels, in the order n+1, n+2 (mod 3)
          series = [(f"w_to_l{(n + d) % 3}", style) for d, style in ((1, "-"), (2, "--"))] if variant == "asff" else []
        elif key:
          series = [(key(n), "-")]
        else:
          series = [(f"w_pos_{n}", "-"), (f"w_bg_{n}", "--")] if variant == "asff" else []
        for k, style in series:
          if k not in rr[0]:
            continue
          y = np.array([r[k] for r in rr], float)
          ax.plot(x, y, style, color=f"C{i}", marker="o", ms=3, label=f"{variant} ({run})" if style == "-" else None)
          ax.fill_between(x, [r[k + "_lo"] for r in rr], [r[k + "_hi"] for r in rr], color=f"C{i}", alpha=0.2, lw=0)
      if p == 1:
        ax.axhline(0.0, color="grey", lw=0.5)
      if p == 2:
        ax.axhline(0.5, color="grey", lw=0.5)
      ax.set_title(f"{LEVEL_NAMES[n]}: {title}", fontsize=8)
    axes[-1, n].set_xlabel("training step")
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=80)
  plt.close(fig)


def read_rows(path: str) -> list[dict]:
  """Rows of an earlier ``results.csv`` (numbers back to int / float; empty cells left out, as written)."""
  ints = ("step", "level", "probe_images", "num_positive", "images_with_positives")
  with open(path) as f:
    return [{k: (v if k in ("run", "variant") else int(v) if k in ints else float(v))
             for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--runs", nargs="*", default=None, help="workdirs of runs to probe")
  p.add_argument("--steps", default="", help="comma-separated steps to probe (default: 0 and every checkpoint)")
  p.add_argument("--num_images", type=int, default=64)
  p.add_argument("--chunk", type=int, default=0, help="images per probe call (default: the run's batch size)")
  p.add_argument("--merge", nargs="*", default=[], help="earlier results.csv files whose rows join these "
                 "(the same probe images: same --num_images and dataset)")
  p.add_argument("--train", action="store_true", help="train one short run per --variants first")
  p.add_argument("--config", default=os.path.join(REPO, "configs", "digits_aug.py"))
  p.add_argument("--variants", default="sum,asff")
  p.add_argument("--train_steps", type=int, default=300)
  p.add_argument("--probe_every", type=int, default=100)
  p.add_argument("--workdir_root", default="/tmp/gradient_probe")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "gradient_probe"))
  args = p.parse_args(argv)
  t0 = time.time()
  command = "python experiments/gradient_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
  runs = list(args.runs or [])
  if args.train:
    logging.getLogger().setLevel(logging.INFO)  # training progress lines
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
      workdir = os.path.join(args.workdir_root, variant)
      train.train_and_evaluate(variant_config(args.config, variant, args.train_steps, args.probe_every), workdir)
      runs.append(workdir)
  merged = [r for path in args.merge for r in read_rows(path)]
  if not runs and not merged:
    raise SystemExit("gradient_probe: give --runs DIR [DIR ...], --train or --merge CSV")
  steps = [int(s) for s in args.steps.split(",") if s.strip()] or None
  if any(r["probe_images"] != args.num_images for r in merged):
    raise SystemExit(f"gradient_probe: a --merge file was probed on another number of images than "
                     f"--num_images {args.num_images}: its rows would not be comparable")
  rows = []
  if not runs:
    write_outputs(args.out, merged, command, time.time() - t0, args.num_images)
    print(f"wrote {args.out}/results.csv, results.md, curves.png")
    return 0
  first = config_lib.load_workdir_config(runs[0])
  images, labels = probe_images(first, args.num_images)
  for workdir in runs[1:]:
    c = config_lib.load_workdir_config(workdir)
    if dataset_key(c) != dataset_key(first):
      raise SystemExit(f"gradient_probe: {workdir} trains on {dataset_key(c)}, {runs[0]} on {dataset_key(first)}; "
                       "probe runs of one dataset and input size together")
  for workdir in runs:
    rows += probe_run(workdir, steps, images, labels, chunk=args.chunk)
  probed = {r["run"] for r in rows}
  rows = [r for r in merged if r["run"] not in probed] + rows
  write_outputs(args.out, rows, command, time.time() - t0, len(images))
  print(f"wrote {args.out}/results.csv, results.md, curves.png ({(time.time() - t0) / 60:.1f} min)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
