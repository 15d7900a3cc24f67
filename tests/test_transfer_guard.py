"""GPU/TPU readiness: the jitted training step and inference make no host round-trips.

Under ``jax.transfer_guard('disallow')`` any implicit host↔device transfer
inside a call raises. Inputs are placed on device first (explicit transfers are
allowed); the step and the forward + NMS must then run without one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax import inference, optim, sharding as shd, train
from asff_jax.models import create_model
from asff_jax.train_state import create_train_state
from tests.conftest import tiny_config


def _tiny():
  return train.resolve_config(tiny_config())


def test_train_step_and_inference_need_no_host_transfers():
  config = _tiny()
  model = create_model(config)
  mesh = shd.make_mesh()
  size = int(config.dataset.input_size)
  shape = (1, size, size, 3)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
  opt = optim.make_optimizer(config, params, steps_per_epoch=int(config.steps_per_epoch),
                             num_train_steps=int(config.num_train_steps))
  state = create_train_state(model, opt.tx, jax.random.key(0), shape, sharding=shd.replicated(mesh))
  step_fn = train.make_train_step_fn(model=model, config=config, tx=opt.tx, lr_fn=opt.lr_fn,
                                     loss_fn=train.default_loss_fn(), mesh=mesh)
  batches = [shd.make_global_batch(train.synthetic_batch(config, s), mesh, int(config.batch_size)) for s in range(3)]
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
