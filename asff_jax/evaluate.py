"""COCO evaluation of a checkpoint: ``python -m asff_jax.evaluate --workdir DIR``.

::

    python -m asff_jax.evaluate --workdir DIR [--checkpoint STEP] [--ema | --noema] \\
        [--config.dataset.root=OTHER_COCO_FOLDER] [--config.eval.input_size=416] [--out_dir D]

Reads the resolved config saved in ``DIR/config.json`` (laid over
:func:`asff_jax.config.default_config`, so every key exists and can be
overridden with ``--config.key=value``), restores checkpoint ``STEP`` (default:
the latest) and evaluates it on ``dataset.eval_split`` with the official
test-time settings; writes ``<out_dir>/<split>_metrics.json`` and
``<split>_results.json`` and prints the metrics. The library is
:mod:`asff_jax.evaluation.evaluator`.

Errors (one line, exit status 2): a missing workdir, config or checkpoint; a
class-count mismatch between the checkpoint's model and the dataset.
"""

from __future__ import annotations

import sys

from asff_jax import cli  # first: quiets TensorFlow before it is imported

from absl import flags  # noqa: E402

from asff_jax.evaluation import evaluator  # noqa: E402


def main(argv=None):
  """CLI entry point (absl flags)."""

  def define(fv, argv_):
    cli.define_model_source_flags(fv, argv_, "asff_jax.evaluate", allow_pth=False)
    flags.DEFINE_bool("ema", None, "Use the EMA parameters (default: if the run had EMA).", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Output folder (default: WORKDIR/eval).", flag_values=fv)

  def run(f):
    metrics = evaluator.evaluate_workdir(f.workdir, f.config, step=f.checkpoint, use_ema=f.ema,
                                         out_dir=f.out_dir)
    print(evaluator.format_metrics(metrics))

  return cli.run(run, "asff_jax.evaluate", argv, define)


if __name__ == "__main__":
  sys.exit(main())
