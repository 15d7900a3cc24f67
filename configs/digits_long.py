"""The digits task with a longer budget (at most 2 hours on a 2-core CPU), for the experiments.

    python -m asff_jax.train --config configs/digits_long.py --workdir DIR

Same model, input (256 px), batch (2) and recipe as ``configs/default.py``,
trained 24,000 steps instead of 6,500 (48,000 images, 16 epochs of the 3,000
training images; the warm-up and the per-step cosine follow the longer run).
At the ~13.5 images/s of the default run on this machine that is about
1 hour, evaluations included, i.e. inside the 2-hour budget with room for a
slower machine. Periodic COCO evaluation every 3,000 steps on 200 val images,
the full val split at the end. Measured 2026-12-01 on this machine: 63 min
10 s, final AP 0.452 / AP50 0.615 (AP75 0.550, APs 0.235, APm 0.628, APl
0.723) on the 500 val images; the curve is in ``experiments/default_config.md``.
"""

from pathlib import Path

from asff_jax.train import load_config_file


def get_config():
  c = load_config_file(Path(__file__).with_name("default.py"))
  c.num_train_steps = 24000
  c.eval_every_steps = 3000
  c.checkpoint_every_steps = 3000
  c.log_every_steps = 500
  return c
