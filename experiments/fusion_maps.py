"""The paper's Figure 3: detections, the fused feature maps and the learned ASFF weights α/β/γ of each level.

::

    python experiments/fusion_maps.py --workdir DIR [--num_images 4] [--score_thre 0.2] \\
        [--out experiments/fusion_maps] [--checkpoint STEP]

Takes the first ``--num_images`` images of the run's evaluation split (a
``digits`` or ``coco_folder`` dataset: files under ``root/<eval_split>/``, or
``--images a.jpg ...``), runs checkpoint ``STEP`` (default latest) of an
``asff`` run through :func:`asff_jax.tools.predict.predict_files` with fusion maps
on, and writes for each image ``<name>.png`` (detections) and
``<name>_fusion.png``: per fused level l (rows; strides 32, 16, 8) the image
with its detections, the fused feature map (channel sum, as the official
``vis``) and the three weight maps α, β, γ — the weight level l
gives the resized features x^{1→l}, x^{2→l}, x^{3→l} (paper Eq. 1–2, they sum
to 1 at every cell). Also ``detections.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from asff_jax.config import load_workdir_config  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.data.sources import DEFAULT_DIGITS_DIR  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.tools.predict import predict_files  # noqa: E402  pylint: disable=wrong-import-position
from asff_jax.training.checkpoints import available_steps  # noqa: E402  pylint: disable=wrong-import-position


def eval_images(config, n: int) -> list[str]:
  """Paths of the first ``n`` images of the config's eval split (COCO-format folder or digits)."""
  root = config.dataset.root or (DEFAULT_DIGITS_DIR if config.dataset.source == "digits" else None)
  if root is None:
    raise SystemExit("fusion_maps: the run's dataset has no local folder; pass --images")
  root = os.path.expanduser(str(root))
  split = config.dataset.eval_split
  with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
    images = json.load(f)["images"][:n]
  return [os.path.join(root, split, im["file_name"]) for im in images]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--checkpoint", type=int, default=None)
  p.add_argument("--num_images", type=int, default=4)
  p.add_argument("--images", nargs="*", default=None)
  p.add_argument("--score_thre", type=float, default=0.2)
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "fusion_maps"))
  args = p.parse_args(argv)
  t0 = time.time()
  config = load_workdir_config(args.workdir)
  if config.model.fusion != "asff":
    raise SystemExit(f"fusion_maps: {args.workdir} has model.fusion={config.model.fusion!r}; "
                     "only ASFF learns fusion weights")
  paths = args.images or eval_images(config, args.num_images)
  step = args.checkpoint if args.checkpoint is not None else max(available_steps(args.workdir), default=None)
  if step is None:
    raise SystemExit(f"fusion_maps: {args.workdir} has no checkpoint")
  res = predict_files(args.workdir, paths, args.out, config=config, step=step,
                      score_thre=args.score_thre, fusion_maps=True)
  print(f"wrote {len(paths)} images to {args.out} (step {step}, {time.time() - t0:.0f} s)")
  return 1 if res["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
