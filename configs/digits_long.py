"""The digits task with a longer budget (about 2 hours on a 2-core CPU), for the experiments.

    python -m asff_jax.train --config configs/digits_long.py --workdir DIR

Same model and recipe as ``configs/default.py`` but 320 px inputs (the
smallest digits stay above ~6 px) and 4,000 steps of batch 16 (about 21
epochs of the 3,000 training images; ~10 images/s at 320 px on this machine,
so ~1 h 50 min including evaluation). Periodic COCO evaluation every 500 steps
on 200 val images, the full val split at the end.

Status: the AP this reaches has not been measured yet (see
``experiments/default_config.md``; README records it once run).
"""

import importlib.util
from pathlib import Path


def _default():
  spec = importlib.util.spec_from_file_location("default_config", Path(__file__).with_name("default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config():
  c = _default()
  c.num_train_steps = 4000
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.log_every_steps = 100
  c.dataset.input_size = 320
  c.dataset.first_size = 320
  c.schedule.warmup_epochs = 1.0
  return c
