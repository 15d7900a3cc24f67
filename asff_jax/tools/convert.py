"""The ``convert`` CLI: official PyTorch ASFF weights → a checkpoint folder.

::

    python -m asff_jax.convert --pth YOLOv3-ASFF_40.6.pth \
        --config configs/coco_asff_608.py --out DIR [--non_strict]

writes an orbax checkpoint ``DIR/checkpoints/0/state`` holding
``{'params', 'batch_stats'}`` and the config (``DIR/config.json``), the same
layout as a training workdir (:func:`asff_jax.training.checkpoints.write_workdir`).
Needs the ``convert`` extra (torch). The mapping itself (names, layouts,
strict / non-strict loading, the load report) is
:mod:`asff_jax.models.official_weights`, re-exported here for library use::

    from asff_jax.tools.convert import variables_from_official
"""

from __future__ import annotations

import sys

from asff_jax import cli  # first: quiets TensorFlow before it is imported

from absl import flags  # noqa: E402

from asff_jax.models.official_weights import (  # noqa: E402,F401  (re-exported)
    LoadReport, expected_layout, load_official_checkpoint, official_to_flax, strip_state_dict,
    variables_from_official, variables_to_official)
from asff_jax.training import checkpoints  # noqa: E402


def main(argv=None):
  """CLI entry point: ``python -m asff_jax.convert --pth F --config C --out DIR [--non_strict]``."""

  def define(fv, argv_):
    flags.DEFINE_string("pth", None, "official .pth checkpoint", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_bool("non_strict", False, "load a partial checkpoint (e.g. the Darknet-53 backbone file)", flag_values=fv)
    cli.define_config_from_file(fv, argv_)
    flags.mark_flags_as_required(["pth", "out"], flag_values=fv)

  def run(f):
    sd = load_official_checkpoint(f.pth)
    variables, report = variables_from_official(sd, f.config, strict=not f.non_strict, return_report=True)
    print(report)
    out = checkpoints.write_workdir(f.out, variables, f.config)
    print(f"wrote {out}/checkpoints/0 and {out}/config.json")

  return cli.run(run, "asff_jax.convert", argv, define)


if __name__ == "__main__":
  sys.exit(main())
