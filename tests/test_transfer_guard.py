"""GPU/TPU readiness: the jitted training step and inference make no host round-trips.

Under ``jax.transfer_guard('disallow')`` any implicit host↔device transfer
inside a call raises. Inputs are placed on device first (explicit transfers are
allowed); the step and the forward + NMS must then run without one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.config import resolve_config
from asff_jax.data import loader
from asff_jax.evaluation import inference
from asff_jax.models import create_model, losses
from asff_jax.training import optim
from asff_jax.training import sharding as shd
from asff_jax.training.state import create_train_state
from asff_jax.training.step import make_train_step_fn
from tests.conftest import tiny_config


def _tiny():
  config = tiny_config()
  return resolve_config(config, **loader.dataset_info(loader.train_source(config)))


def test_train_step_and_inference_need_no_host_transfers():
  config = _tiny()
  model = create_model(config)
  mesh = shd.make_mesh()
  size = int(config.dataset.input_size)
  shape = (1, size, size, 3)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
  opt = optim.make_optimizer(config, params)
  state = create_train_state(model, opt.tx, jax.random.key(0, impl="rbg"), shape,  # rbg: cheap init compile
                             sharding=shd.replicated(mesh))
  step_fn = make_train_step_fn(model=model, config=config, tx=opt.tx, lr_fn=opt.lr_fn,
                               loss_fn=losses.loss_fn, mesh=mesh)
  it = loader.make_train_iterator(config, 0)
  batches = [shd.make_global_batch(next(it), mesh, int(config.batch_size)) for _ in range(3)]
  state, _ = step_fn(state, batches[0])  # compile outside the guard
  with jax.transfer_guard("disallow"):
    for b in batches[1:]:
      state, metrics = step_fn(state, b)
  assert int(jax.device_get(state.step)) == 3 and np.isfinite(float(jax.device_get(metrics["loss"])))

  predict = inference.make_predict_fn(model, **inference.eval_settings(config))
  images = jax.device_put(batches[0]["images"])
  variables = state.eval_variables
  jax.block_until_ready(predict(variables, images))
  with jax.transfer_guard("disallow"):
    out = predict(variables, images)
    jax.block_until_ready(out)
  assert out["boxes"].shape[0] == images.shape[0]
