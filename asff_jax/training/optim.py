"""Optimizer and learning-rate schedules of the official ASFF recipe (spec §7), in optax.

Optimizer (``config.optimizer``)
--------------------------------
PyTorch ``SGD(lr, momentum=0.9, dampening=0, weight_decay=5e-4)``, i.e. per step::

    g   ← ∇L + wd·p          # weight decay is added to the gradient *before* momentum
    buf ← momentum·buf + g   # dampening 0; the first step gives buf = g
    p   ← p − lr(t)·buf

which is ``optax.chain(add_decayed_weights(wd, mask), trace(momentum),
scale(−lr))`` (``optax.sgd(…)`` + ``add_decayed_weights`` chained *after* it
would instead decay outside the momentum buffer, which is not what PyTorch does).

The learning rate is an *injected hyperparameter* (``optax.inject_hyperparams``)
that the train step sets from ``lr_fn(state.step)`` before every update (see
:func:`set_learning_rate`). The LR is therefore a function of the global
iteration counter ``state.step`` even when non-finite steps are skipped, and it
is stored in (and logged from) the optimizer state.

Keys:

* ``lr`` (0.001, official LR), ``momentum`` (0.9), ``nesterov`` (False),
  ``weight_decay`` (5e-4).
* ``weight_decay_on``: which parameters are decayed.

  - ``'all'`` (official default): every parameter, BN γ/β and biases included.
  - ``'official_nowd'``: the official ``--nowd`` rule, decay only on parameters
    whose *official PyTorch name* contains ``"conv.weight"``. The Flax path of
    each parameter is mapped to its official name with
    :func:`asff_jax.models.official_names.official_module_name`, so this is exact for the
    official variants: the kernels of ``add_conv`` blocks (module ``…/conv``),
    the head's output conv (``head_l/conv``) and the deformable conv
    (``dconv.weight`` contains the substring); **not** decayed are the ASFF
    ``weight_levels`` convs, the DCN ``conv_offset``, ``guide_wh``, RFB branch
    convs named otherwise, BN parameters and biases. A parameter without an
    official name falls back to "is a ``kernel`` leaf".
  - ``'kernels'``: every leaf named ``kernel`` (all conv kernels in our Flax
    naming), a simpler "no decay on BN and biases" rule.

* ``lr_scaling``: the official LR is **not scaled** with the global batch (the
  official README trains with 10 GPUs × 5 = 50 images, the paper with
  4 × 16 = 64, both at LR 0.001). ``'none'`` (default) reproduces that.
  ``'linear'`` applies the linear scaling rule
  ``lr = lr · batch_size / reference_batch_size`` with ``reference_batch_size``
  64 (the paper's global batch): use it when training with a much larger or
  smaller global batch than 64.
* ``ema_decay``: EMA of the parameters (the official code has none): 0 = off.
  Evaluation uses the average when ``eval.use_ema`` (default); the BatchNorm
  statistics stay the live model's. A run shorter than three averaging
  windows (``3 / (1 − ema_decay)`` steps) uses a decay cut to
  ``1 − 3 / num_train_steps``, with a warning (:func:`asff_jax.config.ema_decay`).
* ``ema_warmup_steps`` (τ): the decay at update t is
  ``ema_decay · (1 − exp(−t/τ))`` (:func:`asff_jax.training.step.ema_decay_at`),
  so early averages do not carry the random initialisation; 0 = constant decay;
  −1 (default) = ``min(2000, num_train_steps / 10)``
  (:func:`asff_jax.training.step.ema_warmup_for`), so the decay reaches
  ``ema_decay`` by the end of short runs too.
* ``name``: ``'sgd'`` (official) or ``'adamw'`` (``optax.adamw`` with ``b1``,
  ``b2`` and decoupled ``weight_decay`` on the same mask; not in the official
  code, used by the short from-scratch digits configs).
* ``clip_grad_norm``: > 0 clips the global gradient norm before the update
  (official: off).

Schedules (``config.schedule``)
-------------------------------
``name='official'`` (spec §7, ``main.py`` with COS on), with E = steps per
epoch, t = global step and e = t // E:

* e < burn_in_epochs (5): ``lr = base · (t / (burn_in_epochs·E))^burn_in_power``
  (power 4) — per iteration;
* burn_in ≤ e ≤ constant_until_epoch (20): the last warm-up value
  ``base · ((B·E − 1)/(B·E))^4`` (≈ base; the official LR simply stays at the
  value of the last burn-in iteration);
* constant_until < e ≤ cosine_end_epoch (270): per epoch (piecewise constant
  within an epoch) ``min_lr + ½(base − min_lr)(1 + cos(π (e − 20)/(270 − 20)))``;
* e > cosine_end_epoch: ``min_lr`` (1e-5).

``name='warmup_cosine'``: linear warm-up from 0 to base over
``warmup_epochs``, then per-step cosine to ``min_lr`` at ``num_train_steps``.
``name='constant'``: base everywhere.

Short runs (:mod:`asff_jax.config`, "Short runs"): the official schedule's
epoch boundaries are multiplied by :func:`asff_jax.config.schedule_scale`
(E becomes a fractional number of steps), and the warm-up of
``warmup_cosine`` is cut to :func:`asff_jax.config.warmup_steps`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from asff_jax import config as config_lib
from asff_jax.errors import ConfigError
from asff_jax.training import warm_start
from asff_jax.models.official_names import official_module_name

Schedule = Callable[[Any], jax.Array]


def scaled_base_lr(optimizer_config, global_batch_size: int) -> float:
  """The base LR after ``optimizer.lr_scaling`` ('none' → lr; 'linear' → lr·B/ref).

  Raises:
    ConfigError: for an unknown ``lr_scaling``.
  """
  lr = float(optimizer_config.lr)
  mode = optimizer_config.lr_scaling
  if mode == "none":
    return lr
  if mode == "linear":
    return lr * float(global_batch_size) / float(optimizer_config.reference_batch_size)
  raise ConfigError(f"optimizer.lr_scaling must be 'none' or 'linear', got {mode!r}")


def official_schedule(base_lr: float, steps_per_epoch: float, *, burn_in_epochs: int = 5,
                      burn_in_power: float = 4.0, constant_until_epoch: int = 20,
                      cosine_end_epoch: int = 270, min_lr: float = 1e-5) -> Schedule:
  """The official burn-in → constant → per-epoch cosine → constant schedule (spec §7).

  Args:
    base_lr: the (possibly scaled) base LR.
    steps_per_epoch: E = ``len(dataset) // global_batch`` (official ``epoch_size``); a
      float (> 0) lays the phases over a short run (:func:`asff_jax.config.schedule_scale`).
    burn_in_epochs, burn_in_power, constant_until_epoch, cosine_end_epoch, min_lr:
      see the module docstring.

  Returns:
    ``lr_fn(step)``: jit-compatible, ``step`` an int scalar (array or Python),
    returns a float32 scalar.

  Raises:
    ConfigError: if ``steps_per_epoch <= 0`` or the epoch boundaries are not ordered.
  """
  if not steps_per_epoch > 0:
    raise ConfigError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
  if not 0 <= burn_in_epochs <= constant_until_epoch < cosine_end_epoch:
    raise ConfigError("need 0 <= schedule.burn_in_epochs <= constant_until_epoch < cosine_end_epoch, "
                      f"got {burn_in_epochs}, {constant_until_epoch}, {cosine_end_epoch}")
  integral = float(steps_per_epoch).is_integer()
  burn_steps = burn_in_epochs * steps_per_epoch
  # The official LR holds the value of the last burn-in iteration (step ceil(B·E) − 1).
  hold = (base_lr * ((math.ceil(burn_steps) - 1) / burn_steps) ** burn_in_power
          if burn_steps >= 1 else base_lr)
  span = float(cosine_end_epoch - constant_until_epoch)

  def lr_fn(step):
    t = jnp.asarray(step, jnp.float32)
    if integral:
      epoch = jnp.floor_divide(jnp.asarray(step, jnp.int32), int(steps_per_epoch)).astype(jnp.float32)
    else:
      epoch = jnp.floor(t / steps_per_epoch)
    warm = base_lr * (t / max(burn_steps, 1e-9)) ** burn_in_power
    cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * (epoch - constant_until_epoch) / span))
    lr = jnp.where(epoch < burn_in_epochs, warm,
                   jnp.where(epoch <= constant_until_epoch, hold,
                             jnp.where(epoch <= cosine_end_epoch, cos, min_lr)))
    return lr.astype(jnp.float32)

  return lr_fn


def warmup_cosine_schedule(base_lr: float, num_train_steps: int, *, warmup_steps: int,
                           min_lr: float = 1e-5) -> Schedule:
  """Linear warm-up 0 → base over ``warmup_steps``, per-step cosine to ``min_lr`` at the end.

  Raises:
    ConfigError: if the warm-up is not shorter than training.
  """
  if warmup_steps >= num_train_steps:
    raise ConfigError(f"warm-up ({warmup_steps} steps) must be shorter than training "
                      f"({num_train_steps} steps)")
  sched = optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, num_train_steps,
                                             end_value=min_lr)
  return lambda step: jnp.asarray(sched(step), jnp.float32)


def make_schedule(config, *, base_lr: float) -> Schedule:
  """``config.schedule`` of a resolved config → ``lr_fn(step)`` (short runs fitted, see above).

  Raises:
    ConfigError: for an unknown ``schedule.name`` or invalid boundaries.
  """
  s = config.schedule
  if s.name == "official":
    epoch = int(config.steps_per_epoch) * config_lib.schedule_scale(config)
    return official_schedule(base_lr, epoch, burn_in_epochs=int(s.burn_in_epochs),
                             burn_in_power=float(s.burn_in_power),
                             constant_until_epoch=int(s.constant_until_epoch),
                             cosine_end_epoch=int(s.cosine_end_epoch), min_lr=float(s.min_lr))
  if s.name == "warmup_cosine":
    return warmup_cosine_schedule(base_lr, int(config.num_train_steps),
                                  warmup_steps=config_lib.warmup_steps(config),
                                  min_lr=float(s.min_lr))
  if s.name == "constant":
    return lambda step: jnp.full((), base_lr, jnp.float32)
  raise ConfigError(f"schedule.name must be 'official', 'warmup_cosine' or 'constant', got {s.name!r}")


# ----------------------------------------------------------------------------- weight decay masks


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params, mode: str = "all", *, fusion: str = "asff", backbone: str = "darknet53"):
  """Boolean pytree like ``params``: True where weight decay applies.

  Args:
    params: the ``'params'`` collection (nested dicts; leaves arrays or
      ShapeDtypeStructs).
    mode: ``'all' | 'official_nowd' | 'kernels'`` (module docstring).
    fusion, backbone: ``config.model.fusion`` / ``.backbone`` (the official names depend on them).

  Raises:
    ConfigError: for an unknown mode.
  """
  if mode == "all":
    return jax.tree.map(lambda _: True, params)
  if mode == "kernels":
    return jax.tree_util.tree_map_with_path(lambda p, _: _path_keys(p)[-1] == "kernel", params)
  if mode == "official_nowd":
    def decayed(path, _):
      keys = _path_keys(path)
      if keys[-1] != "kernel":  # BN scale/bias and conv biases never match "conv.weight"
        return False
      try:
        name = official_module_name(keys[:-1], fusion, backbone) + ".weight"
      except KeyError:
        return True
      return "conv.weight" in name

    return jax.tree_util.tree_map_with_path(decayed, params)
  raise ConfigError(f"optimizer.weight_decay_on must be 'all', 'official_nowd' or 'kernels', got {mode!r}")


# ----------------------------------------------------------------------------- the optimizer


def _clip(clip):
  return [optax.clip_by_global_norm(clip)] if clip > 0 else []


def _official_sgd(learning_rate, momentum, weight_decay, mask, nesterov, clip=0.0):
  """PyTorch-ordered SGD: decay added to the gradient, then momentum, then −lr."""
  return optax.chain(
      *_clip(clip),
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )


def _adamw(learning_rate, b1, b2, weight_decay, mask, clip=0.0):
  """``optax.adamw`` (decoupled decay on the ``mask`` leaves), optionally after norm clipping."""
  return optax.chain(*_clip(clip), optax.adamw(learning_rate, b1=b1, b2=b2,
                                               weight_decay=weight_decay, mask=mask))


class Optimizer(NamedTuple):
  """``tx``: the optax transformation; ``lr_fn(step)``: the LR schedule; ``base_lr``: after scaling."""

  tx: optax.GradientTransformation
  lr_fn: Schedule
  base_lr: float


def make_optimizer(config, params) -> Optimizer:
  """Builds the official SGD (+ schedule) from a resolved config.

  Args:
    config: resolved config (``optimizer``, ``schedule``, ``batch_size`` (global),
      ``steps_per_epoch``, ``num_train_steps``, ``model.fusion``).
    params: the params tree (or its ``jax.eval_shape``), for the decay mask
      (parameters frozen by ``init.freeze`` are never decayed).

  Returns:
    :class:`Optimizer`. ``tx.init(params)`` gives a state whose
    ``hyperparams['learning_rate']`` is set each step with :func:`set_learning_rate`.

  Raises:
    ConfigError: unknown optimizer name or any option error from the helpers.
  """
  o = config.optimizer
  if o.name not in ("sgd", "adamw"):
    raise ConfigError(f"optimizer.name must be 'sgd' or 'adamw', got {o.name!r}")
  base_lr = scaled_base_lr(o, int(config.batch_size))
  lr_fn = make_schedule(config, base_lr=base_lr)
  mask = weight_decay_mask(params, o.weight_decay_on, fusion=config.model.fusion,
                           backbone=config.model.backbone)
  frozen = warm_start.frozen_mask(params, config.init.freeze) if "init" in config else None
  if frozen is not None:  # frozen parameters get no decay (their gradient is zeroed in the step)
    mask = jax.tree.map(lambda m, f: bool(m) and not f, mask, frozen)
  clip = float(o.clip_grad_norm)
  if o.name == "sgd":
    tx = optax.inject_hyperparams(_official_sgd, static_args=("mask", "nesterov", "clip"))(
        learning_rate=base_lr, momentum=float(o.momentum), weight_decay=float(o.weight_decay),
        mask=mask, nesterov=bool(o.nesterov), clip=clip)
  else:
    tx = optax.inject_hyperparams(_adamw, static_args=("mask", "clip"))(
        learning_rate=base_lr, b1=float(o.b1), b2=float(o.b2),
        weight_decay=float(o.weight_decay), mask=mask, clip=clip)
  return Optimizer(tx, lr_fn, base_lr)


def set_learning_rate(opt_state, lr):
  """Returns ``opt_state`` (from :func:`make_optimizer`) with the injected LR replaced by ``lr``."""
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})


def get_learning_rate(opt_state) -> jax.Array:
  """The LR last set in ``opt_state``."""
  return opt_state.hyperparams["learning_rate"]


__all__ = ["Optimizer", "make_optimizer", "make_schedule", "official_schedule",
           "warmup_cosine_schedule", "weight_decay_mask", "scaled_base_lr", "set_learning_rate",
           "get_learning_rate"]
