"""Short runs of every config fit their schedules; batch sizes, distributed start-up and TF placement.

A run shorter than its recipe (``--config.num_train_steps=20``) must just work
(asff_jax.config, "Short runs"): every phase boundary lands inside the run and
one warning says what changed. Nothing here trains; schedules are evaluated
directly.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from asff_jax import config as config_lib
from asff_jax.data import loader
from asff_jax.training import optim
from asff_jax.training import sharding as shd
from asff_jax.training.step import dropblock_for_step

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _resolved(path, steps):
  c = config_lib.load_config_file(path)
  c.num_train_steps = steps
  n = c.model.num_classes
  return config_lib.resolve_config(c, num_train_examples=3000 if c.dataset.num_train_examples <= 0 else None,
                                   class_names=[str(i) for i in range(n)], category_ids=list(range(1, n + 1)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("steps", [1, 20])
def test_every_config_fits_a_short_run(path, steps):
  c = _resolved(path, steps)
  params = {"conv": {"kernel": np.zeros((3, 3))}}
  opt = optim.make_optimizer(c, params)  # no "warm-up must be shorter than training" error
  lrs = np.array([float(opt.lr_fn(s)) for s in range(steps + 1)])
  assert np.all(np.isfinite(lrs)) and np.all(lrs >= 0)
  base = opt.base_lr
  shortened = config_lib.schedule_scale(c) < 1 or config_lib.schedule_fit_messages(c)
  if c.schedule.name in ("official", "warmup_cosine") and steps >= 20 and shortened:
    assert lrs.max() == pytest.approx(base, rel=0.05)  # the run reaches the base LR ...
    assert lrs[steps] < 0.5 * base  # ... and decays within it
  sched = loader.train_schedule(c)
  if sched.mixup and sched.mixup_off_from is not None:
    assert 0 <= sched.mixup_off_from <= steps
  if sched.random_resize and sched.fixed_size_from is not None:
    assert 0 <= sched.fixed_size_from <= steps
    assert sched.input_size_at(steps - 1) == c.dataset.input_size
  if c.model.dropblock and steps >= 20:
    assert dropblock_for_step(c, steps - 1) is not None  # the DropBlock phases happen within the run
  messages = config_lib.schedule_fit_messages(c)
  full = int(c.num_epochs) * int(c.steps_per_epoch)
  if steps < full and (c.schedule.name == "official" or c.model.dropblock or c.dataset.mixup):
    assert messages and f"num_train_steps={steps}" in messages[0]


def test_full_length_runs_are_unchanged():
  c = _resolved(CONFIGS[0].with_name("coco_asff_608.py"), -1)
  assert config_lib.schedule_scale(c) == 1.0 and not config_lib.schedule_fit_messages(c)
  ref = optim.official_schedule(0.001, c.steps_per_epoch)
  opt = optim.make_optimizer(c, {"k": np.zeros(2)})
  for s in (0, 100, 5 * c.steps_per_epoch, 100 * c.steps_per_epoch, 280 * c.steps_per_epoch):
    assert float(opt.lr_fn(s)) == float(ref(s))
  default = _resolved(CONFIGS[0].with_name("default.py"), -1)
  assert config_lib.warmup_steps(default) == 750 and not config_lib.schedule_fit_messages(default)


def test_short_official_schedule_is_the_recipe_compressed():
  """20 steps of the COCO recipe: burn-in, plateau, cosine and floor at 20/(301 E) of their steps."""
  c = _resolved(CONFIGS[0].with_name("coco_asff_608.py"), 301)  # one step per recipe epoch
  assert config_lib.schedule_scale(c) == pytest.approx(1 / c.steps_per_epoch)
  lr = optim.make_optimizer(c, {"k": np.zeros(2)}).lr_fn
  ref = optim.official_schedule(0.001, 1)  # the recipe with E = 1
  for s in range(301):
    assert float(lr(s)) == pytest.approx(float(ref(s)), rel=1e-5, abs=1e-12)
  sched = loader.train_schedule(c)
  assert sched.mixup_off_from == 301 - 29 and sched.fixed_size_from == 301 - 10


def test_warmup_cut_to_half_a_short_run():
  c = _resolved(CONFIGS[0].with_name("default.py"), 20)
  assert config_lib.warmup_steps(c) == 10
  assert any("warm-up of 750 steps" in m and "10 steps" in m for m in config_lib.schedule_fit_messages(c))


def test_batch_not_a_multiple_of_the_devices_names_both_and_the_fix():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 1), ("data",))
  assert shd.check_batch_size(2, mesh) == 2
  fake = type("M", (), {"devices": np.zeros(8)})()
  with pytest.raises(config_lib.ConfigError, match=r"batch_size=2 .* multiple of the number of devices \(8\)"
                     r".*--config.batch_size=8"):
    shd.check_batch_size(2, fake)
  assert shd.nearest_valid_batch(10, 8) == 16 and shd.nearest_valid_batch(16, 8) == 16
  assert shd.nearest_valid_batch(0, 4) == 4


@pytest.mark.parametrize("env, kind", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1"}, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"PMI_SIZE": "3"}, "pmi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "gke_tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"TPU_ACCELERATOR_TYPE": "v4-32"}, "cloud_tpu_pod"),
    ({"TPU_ACCELERATOR_TYPE": "v2-8"}, None),  # Colab / one TPU host
    ({"JAX_NUM_PROCESSES": "2"}, "jax_env"),
    ({"ASFF_JAX_DISTRIBUTED": "1"}, "forced"),
])
def test_distributed_start_up_branch(env, kind):
  assert shd.cluster_environment(env) == kind
  assert shd.distributed_init_args(environ=env) == (None if kind is None else {})
  # explicit flags always win and are passed through
  assert shd.distributed_init_args("h:1234", 2, 1, environ=env) == {
      "coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}


def test_tensorflow_is_kept_off_accelerators(monkeypatch):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (the test's own)
  from asff_jax import _tensorflow  # pylint: disable=import-outside-toplevel  (the test's own)

  calls = []
  monkeypatch.setattr(tf.config, "list_physical_devices",
                      lambda kind: ["fake"] if kind == "GPU" else [])
  monkeypatch.setattr(tf.config, "set_visible_devices", lambda devs, kind: calls.append((devs, kind)))
  assert _tensorflow.hide_accelerators_from_tensorflow() == ["GPU"]
  assert calls == [([], "GPU")]
  assert tf.config.get_visible_devices("GPU") == []  # the real state on this machine
