"""COCO evaluation of a checkpoint: ``python -m asff_jax.evaluate --workdir DIR``.

::

    python -m asff_jax.evaluate --workdir DIR [--checkpoint STEP] [--ema | --noema] \\
        [--config.dataset.root=OTHER_COCO_FOLDER] [--config.eval.input_size=416] ...

Reads the resolved config saved in ``DIR/config.json`` (written by
``asff_jax.train`` or ``asff_jax.convert``), lays it over
:func:`asff_jax.train.default_config` (so every key exists and can be
overridden with ``--config.key=value``), restores the variables of checkpoint
``STEP`` (default: the latest) and evaluates them on
``dataset.eval_split`` with the official test-time settings (spec §5: plain
resize to ``eval.input_size`` or ``dataset.input_size``, score threshold
``eval.conf_thre`` 0.001, per-class NMS ``eval.nms_thre`` 0.65, at most
``eval.max_detections`` 100 per image), scored by pycocotools.

Writes ``DIR/eval/<split>_metrics.json`` (AP, AP50, AP75, APs, APm, APl, the
AR values, class-agnostic AP and AP50 — ``AP_agnostic``, ``AP50_agnostic``,
localisation alone — the step, the dataset and input size) and
``DIR/eval/<split>_results.json`` (COCO results format), and prints the
metrics. ``--out_dir`` writes elsewhere (e.g. when evaluating on another
dataset with the same split name).

Errors: a missing workdir / config / checkpoint raises ``FileNotFoundError``
with the path; a class-count mismatch between the checkpoint's model and the
dataset raises ``ValueError`` naming both.
"""

from __future__ import annotations

import logging
import os
import sys

import ml_collections


def merged_config(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``train.default_config()`` updated with a saved config (missing keys keep the defaults)."""
  from asff_jax.train import default_config  # pylint: disable=import-outside-toplevel

  base = default_config()

  def update(dst, src):
    for k, v in src.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)) and k in dst and isinstance(
          dst[k], ml_collections.ConfigDict):
        update(dst[k], v)
      else:
        with dst.ignore_type():
          dst[k] = v

  with base.unlocked():
    update(base, saved.to_dict() if hasattr(saved, "to_dict") else saved)
  return base


def evaluate_workdir(workdir: str, config=None, *, step=None, use_ema=None, out_dir=None,
                     log=print) -> dict:
  """Evaluates checkpoint ``step`` of ``workdir``; returns the metrics and writes the JSON files.

  Args:
    workdir: training or convert workdir.
    config: full config (default: the workdir's, merged over the defaults).
    step: checkpoint step (None = latest).
    use_ema: take EMA parameters if present (None = when the config enables EMA).
    out_dir: where to write (default ``workdir/eval``).
  """
  from asff_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from asff_jax.data import loader  # pylint: disable=import-outside-toplevel

  if config is None:
    config = merged_config(checkpoints.load_config(workdir))
  variables, step = checkpoints.load_variables(workdir, step, use_ema=use_ema)
  out_dir = out_dir or os.path.join(workdir, "eval")
  metrics = loader.evaluate_variables(config, variables, out_dir=out_dir, tag=int(step), log=log,
                                      max_images=0)
  metrics = dict(metrics, step=int(step))
  log(format_metrics(metrics))
  return metrics


def format_metrics(m: dict) -> str:
  """One line: ``AP 0.4310  AP50 ...`` plus the image count."""
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP50_agnostic")
  body = "  ".join(f"{k} {m[k]:.4f}" for k in names if k in m)
  return f"step {m.get('step', '?')}: {body}  ({int(m.get('num_images', 0))} images)"


def define_workdir_flags(argv, prog: str) -> None:
  """Defines ``--workdir``, ``--checkpoint`` and ``--config`` (the workdir's config, overridable).

  ``--config`` defaults to the workdir's saved config laid over the defaults,
  so ``--config.key=value`` works for every key. Used by ``evaluate`` and ``predict``.

  Raises:
    SystemExit: without ``--workdir``.
    FileNotFoundError: the workdir has no ``config.json``.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  from asff_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  workdir = checkpoints.workdir_from_argv(argv)
  if workdir is None:
    raise SystemExit(f"{prog}: --workdir DIR is required")
  config_flags.DEFINE_config_dict("config", merged_config(checkpoints.load_config(workdir)),
                                  "config (default: the workdir's config.json)")
  flags.DEFINE_string("workdir", None, "Training or convert workdir.")
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: latest).")


def main(argv=None):
  """CLI entry point (absl flags)."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  argv = list(sys.argv if argv is None else argv)
  define_workdir_flags(argv, "asff_jax.evaluate")
  flags.DEFINE_bool("ema", None, "Use the EMA parameters (default: if the run had EMA).")
  flags.DEFINE_string("out_dir", None, "Output folder (default: WORKDIR/eval).")
  FLAGS = flags.FLAGS

  def _run(_):
    logging.getLogger().setLevel(logging.INFO)
    evaluate_workdir(FLAGS.workdir, FLAGS.config, step=FLAGS.checkpoint, use_ema=FLAGS.ema,
                     out_dir=FLAGS.out_dir)

  app.run(_run, argv=argv)


if __name__ == "__main__":
  main()
