"""COCO evaluation of a checkpoint or of official weights: ``python -m asff_jax.evaluate``.

::

    python -m asff_jax.evaluate --workdir DIR [--checkpoint STEP] [--ema | --noema] \\
        [--config.dataset.root=OTHER_COCO_FOLDER] [--config.eval.input_size=416] [--out_dir D]
    python -m asff_jax.evaluate --pth YOLOv3-ASFF_40.6.pth --config configs/coco_asff_608.py \\
        [--config.dataset.source=coco_folder --config.dataset.root=COCO] [--out_dir D]

``--pth`` converts official PyTorch weights on the fly (needs the ``convert``
extra) with the model of ``--config``; results go to ``--out_dir`` (default
``eval_<pth name>``).

Reads the resolved config saved in ``DIR/config.json`` (laid over
:func:`asff_jax.config.default_config`, so every key exists and can be
overridden with ``--config.key=value``), restores checkpoint ``STEP`` (default:
the latest) and evaluates it on ``dataset.eval_split`` with the official
test-time settings; writes ``<out_dir>/<split>_metrics.json`` and
``<split>_results.json`` and prints the metrics and the per-class AP table
(also stored under ``per_class`` in the metrics JSON). On an images-only split
(COCO test-dev: ``--config.dataset.eval_split=test-dev2017`` with
``annotations/image_info_test-dev2017.json`` and the images in ``test2017/``)
it writes ``detections_test-dev2017_<eval.results_name>_results.json`` for the
evaluation server and skips the metrics. The library is
:mod:`asff_jax.evaluation.evaluator`.

Errors (one line, exit status 2): a missing workdir, config or checkpoint; a
class-count mismatch between the checkpoint's model and the dataset.
"""

from __future__ import annotations

import os
import sys

from asff_jax import cli  # first: quiets TensorFlow before it is imported

from absl import flags  # noqa: E402

from asff_jax.evaluation import evaluator  # noqa: E402
from asff_jax.models import official_weights  # noqa: E402


def main(argv=None):
  """CLI entry point (absl flags)."""

  def define(fv, argv_):
    cli.define_model_source_flags(fv, argv_, "asff_jax.evaluate", allow_pth=True)
    flags.DEFINE_bool("ema", None, "Use the EMA parameters (default: if the run had EMA).", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Output folder (default: WORKDIR/eval).", flag_values=fv)

  def run(f):
    if f.pth:
      state_dict = official_weights.load_official_checkpoint(f.pth)
      variables = official_weights.variables_from_official(state_dict, f.config)
      out_dir = f.out_dir or f"eval_{os.path.splitext(os.path.basename(f.pth))[0]}"
      metrics = evaluator.evaluate_variables(f.config, variables, out_dir=out_dir, max_images=0,
                                             tag=os.path.basename(f.pth), per_class=True)
    else:
      metrics = evaluator.evaluate_workdir(f.workdir, f.config, step=f.checkpoint, use_ema=f.ema,
                                           out_dir=f.out_dir)
    table = evaluator.format_per_class(metrics.pop("per_class", []))
    if table:
      print(table)
    print(evaluator.format_metrics(metrics))

  return cli.run(run, "asff_jax.evaluate", argv, define)


if __name__ == "__main__":
  sys.exit(main())
