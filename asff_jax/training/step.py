"""The training step: loss, gradient, optimizer update, non-finite guard (pure; jit it).

Loss and batch size
-------------------
The official loss is a sum divided by the *per-GPU* batch, and DDP averages the
gradients over GPUs: that equals the global-batch sum divided by the global
batch, which is what :func:`asff_jax.models.losses.loss_fn` computes on the
globally sharded batch. The LR is **not** scaled with the batch by default
(``optimizer.lr_scaling``, see :mod:`asff_jax.training.optim`).

Non-finite guard
----------------
Inside the jitted step a NaN/Inf loss or gradient selects the old params,
optimizer state, BN statistics and EMA (``jnp.where`` on an ``isfinite`` flag;
no host sync). The skipped step still counts in ``state.step`` (the batch is
consumed) and in ``state.nonfinite_count``; the loop stops after
``max_consecutive_nonfinite`` in a row.

Frozen parameters (``init.freeze``)
-----------------------------------
Matching parameters get a zero gradient and keep their old value and EMA;
their batch norms run in eval mode (:mod:`asff_jax.training.warm_start`).

DropBlock (spec §7)
-------------------
:func:`dropblock_for_step` gives the static DropBlock setting of a step; each
distinct setting compiles the step once.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from asff_jax import config as config_lib
from asff_jax.models.layers import frozen_batch_norm
from asff_jax.training import optim
from asff_jax.training import warm_start
from asff_jax.training import sharding as shd
from asff_jax.training.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict]]


def dropblock_for_step(config, step: int) -> Optional[tuple]:
  """The official DropBlock setting at ``step``: None or 3 × ``(block_size, keep_prob)``.

  Only with ``model.dropblock``; from ``dropblock_schedule`` (epoch boundaries,
  spec §7: none before epoch 5, [1,3,5] from 5, [3,5,7] from 80, [7,7,7] from
  150), laid out over a short run by :func:`asff_jax.config.schedule_scale`.
  """
  if not config.model.dropblock:
    return None
  epoch_steps = int(config.steps_per_epoch) * config_lib.schedule_scale(config)
  sizes = None
  for start, blocks in config.dropblock_schedule:
    if step >= start * epoch_steps:
      sizes = blocks
  if sizes is None:
    return None
  keep = float(config.dropblock_keep_prob)
  return tuple((int(bs), keep) for bs in sizes)


def all_finite(tree) -> jax.Array:
  """Scalar bool: every element of every leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def ema_decay_at(t, decay: float, warmup_steps: float = 0.0):
  """The EMA decay used at update ``t`` (1-based): ``decay · (1 − exp(−t / τ))``, or ``decay`` if τ = 0.

  With τ > 0 the weight of the step-0 parameters in the average after ``T`` updates is
  ``∏_t d_t`` (``d_1 ≈ decay / τ`` after the first update, below 1e-9 after three for τ ≫ 1), where a
  constant decay leaves ``decay^T`` of them (13.5 % after 2,000 updates at 0.999). The same ramp as
  ultralytics' ``ModelEMA`` (τ = 2,000 there); the decay reaches 0.99 · ``decay`` only at t ≈ 4.6 τ
  (:func:`ema_warmup_for` picks τ from the run length).

  Args:
    t: scalar update count (traced or Python), ≥ 1.
    decay: the asymptotic decay in [0, 1).
    warmup_steps: τ in updates; 0 = constant.
  """
  if warmup_steps <= 0:
    return decay
  return decay * -jnp.expm1(-jnp.asarray(t, jnp.float32) / float(warmup_steps))  # 1 − e^{−x}, exact for small x


def ema_warmup_for(config) -> float:
  """τ for :func:`ema_decay_at` from ``config.optimizer.ema_warmup_steps``.

  ≥ 0 is taken as given (0 = constant decay); −1 (the default) = ``min(2000, num_train_steps / 10)``
  (2,000 when the run length is not resolved yet), so that the decay reaches
  ``ema_decay · (1 − e^{−10})`` by the end of any run, short ones included — a fixed τ = 2,000 leaves a
  6,500-step run at ``0.96`` for ``ema_decay`` 0.999, i.e. an average over ~25 steps.
  """
  tau = float(config.optimizer.get("ema_warmup_steps", 0.0))
  if tau >= 0:
    return tau
  steps = int(config.get("num_train_steps", -1))
  return min(2000.0, steps / 10.0) if steps > 0 else 2000.0


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model, config, tx,
               lr_fn, loss_fn: LossFn, dropblock=None, ema_decay: float = 0.0,
               ema_warmup_steps: float = 0.0):
  """One SGD step (pure; jit it with the state donated).

  Args:
    state: the current :class:`TrainState`.
    batch: ``{'images': (B, S, S, 3), 'labels': (B, N, 5|6)}`` (global batch).
    model, config, tx, lr_fn: the detector, the resolved config, the optax
      transformation and LR schedule (:func:`asff_jax.training.optim.make_optimizer`).
    loss_fn: ``loss_fn(variables, images, labels, *, model, config, train, rng
      [, dropblock])`` (:func:`asff_jax.models.losses.loss_fn`).
    dropblock: static DropBlock setting (:func:`dropblock_for_step`).
    ema_decay: > 0 updates ``state.ema_params``: ``ema ← d·ema + (1 − d)·params`` after the update.
    ema_warmup_steps: τ > 0 ramps the decay up, ``d = ema_decay · (1 − exp(−t / τ))`` at update
      ``t = state.step + 1`` (:func:`ema_decay_at`), so the average forgets the initialisation
      early on; 0 = the constant ``ema_decay``.

  Returns:
    ``(new_state, metrics)``; metrics are scalars (among them ``cls_acc``, the
    argmax class accuracy at the positives, and ``positives_per_image``) except
    the per-level ``loss_<component>`` arrays of shape (3,).
  """
  lr = lr_fn(state.step)
  opt_state = optim.set_learning_rate(state.opt_state, lr)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(config.seed)), 1), state.step)
  extra = {"dropblock": dropblock} if dropblock is not None else {}

  freeze = config.init.freeze if "init" in config else None
  frozen = warm_start.frozen_mask(state.params, freeze) if freeze else None

  def compute_loss(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    with frozen_batch_norm(freeze):
      return loss_fn(variables, batch["images"], batch["labels"], model=model, config=config,
                     train=True, rng=rng, **extra)

  (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  if frozen is not None:  # init.freeze: no gradient into the frozen parameters
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
  aux = dict(aux)
  new_batch_stats = aux.pop("batch_stats")
  finite = jnp.isfinite(loss) & all_finite(grads)

  updates, new_opt_state = tx.update(grads, opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  if ema_decay > 0:
    d = ema_decay_at(state.step + 1, ema_decay, ema_warmup_steps)
    new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, new_params)
  else:
    new_ema = state.ema_params

  if frozen is not None:  # bit-identical frozen leaves (and their EMA) whatever the optimizer does
    new_params = jax.tree.map(lambda n, o, f: o if f else n, new_params, state.params, frozen)
    if ema_decay > 0:
      new_ema = jax.tree.map(lambda n, o, f: o if f else n, new_ema, state.ema_params, frozen)

  def pick(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  nonfinite = jnp.logical_not(finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1,
      params=pick(new_params, state.params),
      batch_stats=pick(new_batch_stats, state.batch_stats),
      opt_state=pick(new_opt_state, opt_state),
      ema_params=pick(new_ema, state.ema_params),
      nonfinite_count=state.nonfinite_count + nonfinite,
      consecutive_nonfinite=(state.consecutive_nonfinite + 1) * nonfinite,
  )
  num_pos, cls_correct = aux.pop("num_pos", None), aux.pop("cls_correct", None)
  metrics = {f"loss_{k}": v for k, v in aux.items() if k != "total"}
  if num_pos is not None:  # class accuracy (argmax) at the positives, all levels
    metrics["cls_acc"] = jnp.sum(cls_correct) / jnp.maximum(jnp.sum(num_pos), 1.0)
    metrics["positives_per_image"] = jnp.sum(num_pos) / batch["images"].shape[0]
  metrics.update(loss=loss, lr=lr, grad_norm=optax.global_norm(grads), finite=finite,
                 nonfinite_count=new_state.nonfinite_count,
                 consecutive_nonfinite=new_state.consecutive_nonfinite)
  return new_state, metrics


def make_train_step_fn(*, model, config, tx, lr_fn, loss_fn: LossFn, mesh):
  """``step_fn(state, batch, dropblock) -> (state, metrics)``: jitted, state donated.

  One compiled function per distinct (static) DropBlock setting and input shape.
  """
  repl, data = shd.replicated(mesh), shd.data_sharded(mesh)
  ema = config_lib.ema_decay(config)  # optimizer.ema_decay, cut for runs shorter than 3 averaging windows
  ema_warmup = ema_warmup_for(config)
  compiled = {}

  def step_fn(state, batch, dropblock=None):
    if dropblock not in compiled:
      fn = functools.partial(train_step, model=model, config=config, tx=tx, lr_fn=lr_fn,
                             loss_fn=loss_fn, dropblock=dropblock, ema_decay=ema,
                             ema_warmup_steps=ema_warmup)
      compiled[dropblock] = jax.jit(fn, in_shardings=(repl, data), out_shardings=(repl, repl),
                                    donate_argnums=(0,))
    return compiled[dropblock](state, batch)

  return step_fn
