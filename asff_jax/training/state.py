"""The train state and its (born-sharded) creation.

:class:`TrainState` is a plain pytree (a ``flax.struct`` dataclass) of arrays,
so orbax saves it as nested dicts that can be read back without this package::

    step                   int32 ()  — number of batches consumed (= optimizer iterations)
    params                 float32 tree (Flax ``'params'``)
    batch_stats            float32 tree (Flax ``'batch_stats'``, BN running mean/var)
    opt_state              optax state (injected hyperparams incl. the current LR,
                           SGD momentum buffers)
    ema_params             float32 tree like ``params``, or ``{}`` when EMA is off
    nonfinite_count        int32 ()  — total steps skipped because loss/grads were not finite
    consecutive_nonfinite  int32 ()  — length of the current run of skipped steps
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """See the module docstring. All fields are arrays (no static fields)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  nonfinite_count: jax.Array
  consecutive_nonfinite: jax.Array

  @property
  def variables(self) -> dict:
    """``{'params', 'batch_stats'}`` for ``model.apply``."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def eval_variables(self) -> dict:
    """Like :attr:`variables` but with the EMA params when EMA is on."""
    params = self.ema_params if self.ema_params else self.params
    return {"params": params, "batch_stats": self.batch_stats}


def init_state(variables: dict, tx: optax.GradientTransformation, *, use_ema: bool) -> TrainState:
  """A step-0 :class:`TrainState` from model variables (pure; jit it)."""
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else {},
      nonfinite_count=jnp.zeros((), jnp.int32),
      consecutive_nonfinite=jnp.zeros((), jnp.int32),
  )


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array, input_shape,
                       *, sharding, use_ema: bool = False,
                       init_variables: Callable[[], dict] | None = None) -> TrainState:
  """Initialises the model and optimizer *directly into* ``sharding`` (born sharded).

  Runs ``model.init`` + ``tx.init`` in one ``jax.jit`` with ``out_shardings=sharding``
  (a replicated ``NamedSharding`` for data parallelism), so no host copy of the
  state is ever made.

  Args:
    model: the Flax detector.
    tx: optax transformation.
    rng: PRNG key for ``model.init``.
    input_shape: ``(1, H, W, 3)`` dummy input shape for ``init``.
    sharding: a ``Sharding`` (applied to every leaf) or a matching pytree.
    use_ema: allocate ``ema_params``.
    init_variables: optional ``() -> variables`` replacing ``model.init`` (e.g.
      converted official weights); traced inside the same jit.
  """
  def init_fn(key):
    if init_variables is not None:
      variables = init_variables()
    else:
      variables = model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)
    return init_state(dict(variables), tx, use_ema=use_ema)

  return jax.jit(init_fn, out_shardings=sharding)(rng)


def abstract_train_state(model, tx, input_shape, *, sharding, use_ema: bool = False) -> TrainState:
  """``jax.ShapeDtypeStruct`` tree of the state with ``sharding`` attached (orbax restore target)."""
  def init_fn(key):
    variables = model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)
    return init_state(dict(variables), tx, use_ema=use_ema)

  shapes = jax.eval_shape(init_fn, jax.random.key(0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
