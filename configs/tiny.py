"""Tiny smoke-test config: a 1/8-width ASFF model on small synthetic images at 64 px (CPU, seconds).

    python -m asff_jax.train --config configs/tiny.py --workdir /tmp/asff_tiny

Used by ``tests/test_train.py`` and friends. The schedule is the official
shape (burn-in → constant → cosine → floor) squeezed into a few epochs of
2 steps, with a larger LR so that a few steps visibly move the weights.
"""

from asff_jax.config import default_config


def get_config():
  config = default_config()
  config.seed = 0
  config.batch_size = 4
  config.num_train_steps = 6
  config.steps_per_epoch = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 3
  config.eval_every_steps = 0
  config.eval_at_end = False  # smoke runs; tests on real data turn it on
  config.max_consecutive_nonfinite = 3
  config.init_rng_impl = "rbg"  # fast init compile on CPU

  config.num_epochs = 3  # the schedule below is laid out over 3 epochs of 2 steps
  config.dataset.source = "synthetic"
  config.dataset.input_size = 64
  config.dataset.max_boxes = 8
  config.dataset.synthetic_num_train = 8
  config.dataset.synthetic_num_val = 4
  config.dataset.synthetic_image_hw = (64, 80)
  config.dataset.synthetic_max_objects = 3
  # for runs on real data (e.g. --config.dataset.source=digits): one fixed size, no mixup
  config.dataset.random_resize = False
  config.dataset.first_size = 64
  config.dataset.mixup = False
  config.eval.input_size = 64

  config.model.width = 0.125
  config.model.stage_blocks = (1, 1, 1, 1, 1)
  config.model.num_classes = 3

  config.optimizer.lr = 0.01
  config.schedule.burn_in_epochs = 1
  config.schedule.constant_until_epoch = 1
  config.schedule.cosine_end_epoch = 3
  config.schedule.min_lr = 1e-4
  config.schedule.warmup_epochs = 1.0
  return config
