"""The digits task with a longer budget (about an hour on a 2-core CPU), for the experiments.

    python -m asff_jax.train --config configs/digits_long.py --workdir DIR

Same model, input (256 px), batch and recipe as ``configs/digits_aug.py`` (the
default until 2026-12-07: official geometric augmentation, tested at 256 px), trained
for 24,000 steps (48,000 images, 16 epochs of the 3,000 training images; the
per-step cosine follows the longer run, the warm-up stays half an epoch, 750 steps). Periodic COCO
evaluation every 3,000 steps on 200 val images, the full val split at the end.
Measured time and AP: README and ``experiments/default_config.md``.
"""

from pathlib import Path

from asff_jax.config import load_config_file


def get_config():
  c = load_config_file(Path(__file__).with_name("digits_aug.py"))
  c.num_train_steps = 24000
  c.eval_every_steps = 3000
  c.checkpoint_every_steps = 3000
  c.log_every_steps = 500
  return c
