"""Training loop for ASFF / YOLOv3 (spec §7): ``jax.jit`` over a data-parallel ``Mesh``.

Command line (every config key can be overridden with ``--config.KEY=VALUE``)::

    python -m asff_jax.train --config configs/tiny.py --workdir /tmp/asff_tiny
    python -m asff_jax.train --config configs/coco_asff_608.py --workdir DIR \\
        --config.batch_size=64 --config.optimizer.lr_scaling=linear
    # multi-host (one command per process; omit on a single host or under Slurm/MPI)
    python -m asff_jax.train ... --coordinator_address=HOST:PORT --num_processes=2 --process_id=0

Library use: :func:`train_and_evaluate` ``(config, workdir, evaluate_fn=None,
loss_fn=None, train_iter_fn=None) -> TrainState``.

What the workdir holds
----------------------
* ``config.json``: the resolved config (``steps_per_epoch`` and
  ``num_train_steps`` filled in);
* ``checkpoints/<step>/``: orbax ``CheckpointManager`` step folders with two
  items, ``state`` (the :class:`~asff_jax.train_state.TrainState` as a plain
  pytree of arrays: restorable with ``ocp.StandardCheckpointer`` or
  ``CheckpointManager`` alone, no project code) and ``config`` (the same JSON);
* TensorBoard event files and the console log (clu ``metric_writers``).

The run resumes automatically from the latest complete checkpoint in
``workdir``. A checkpoint is written every ``checkpoint_every_steps``, at the
end, and when SIGTERM/SIGINT arrives (the handler only sets a flag; the loop
finishes the current step, saves and returns).

Data
----
The data source is one call, ``train_iter_fn(config, start_step)``, returning an
iterator of numpy batches ``{'images': (B, S, S, 3) float32, 'labels': (B, N,
5|6) float32}`` (labels ``[class, cx, cy, w, h(, weight)]`` in input pixels)
whose first item is the batch of step ``start_step``; B is either the global
``batch_size`` or this process's share ``batch_size // process_count`` (see
:func:`asff_jax.sharding.make_global_batch`). :func:`make_train_iterator` picks
the synthetic source (``dataset.source='synthetic'``, a pure function of
(seed, step), used by the tests) or :func:`asff_jax.data.loader.make_train_iterator`
(digits, COCO-format folders, TFDS COCO; random shape and mixup schedules).

Loss and batch size
-------------------
The official loss is a sum divided by the *per-GPU* batch, and DDP averages the
gradients over GPUs: that equals the global-batch sum divided by the global
batch, which is what ``loss_fn`` computes on the globally sharded batch. The
LR is **not** scaled with the batch by default (``optimizer.lr_scaling``,
see :mod:`asff_jax.optim`).

Non-finite guard
----------------
Inside the jitted step a NaN/Inf loss or gradient selects the old params,
optimizer state, BN statistics and EMA (``jnp.where`` on an ``isfinite`` flag;
no host sync). The skipped step still counts in ``state.step`` (the batch is
consumed) and in ``state.nonfinite_count``; ``max_consecutive_nonfinite`` skips
in a row raise :class:`NonFiniteLossError` without writing a checkpoint, so the
last good one stays the latest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from asff_jax import optim
from asff_jax import sharding as shd
from asff_jax.models import create_model, default_model_config
from asff_jax.train_state import TrainState, abstract_train_state, create_train_state

Batch = Mapping[str, np.ndarray]
LossFn = Callable[..., tuple[jax.Array, dict]]
EvaluateFn = Callable[[TrainState, int], Optional[Mapping[str, float]]]


class NonFiniteLossError(RuntimeError):
  """Raised when ``max_consecutive_nonfinite`` consecutive steps had a non-finite loss/gradient."""


# ----------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
  """The official training recipe (spec §7) as a full config tree.

  Top-level keys: ``seed``, ``batch_size`` (global), ``num_epochs`` (301: the
  official loop runs epochs 0..300), ``num_train_steps`` (-1 → num_epochs ·
  steps_per_epoch), ``steps_per_epoch`` (-1 → dataset.num_train_examples //
  batch_size), ``log_every_steps``, ``checkpoint_every_steps``,
  ``keep_checkpoints``, ``eval_every_steps`` (0 = never), ``max_consecutive_nonfinite``,
  ``write_tensorboard``, ``dropblock_schedule``, ``dropblock_keep_prob``;
  sections ``dataset``, ``model``, ``loss``, ``optimizer``, ``schedule``, ``debug``.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # global; official: 5 per GPU × 10 GPUs (README) or 16 × 4 (paper)
  c.num_epochs = 301
  c.num_train_steps = -1
  c.steps_per_epoch = -1
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0
  c.eval_at_end = True  # COCO evaluation after the last step (real datasets)
  c.max_consecutive_nonfinite = 20
  c.write_tensorboard = True
  # Official --dropblock schedule (spec §7): (from_epoch, block sizes of the 3 positions).
  c.dropblock_schedule = ((5, (1, 3, 5)), (80, (3, 5, 7)), (150, (7, 7, 7)))
  c.dropblock_keep_prob = 0.9
  c.preemption_sync_every_steps = 10  # multi-process: how often processes agree on SIGTERM
  # PRNG implementation of the parameter-init key: None = JAX's default (threefry2x32);
  # 'rbg' compiles the init ~3x faster on CPU (different but equally good random values).
  c.init_rng_impl = ml_collections.config_dict.placeholder(str)

  c.dataset = ml_collections.ConfigDict()
  # 'coco_tfds' | 'coco_folder' | 'digits' (asff_jax.data.sources) | 'synthetic' (tests)
  c.dataset.source = "coco_tfds"
  c.dataset.root = ml_collections.config_dict.placeholder(str)
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.dataset.use_crowd = True
  c.dataset.tfds_name = "coco/2017"  # coco_tfds
  c.dataset.eval_gt_json = ml_collections.config_dict.placeholder(str)  # coco_tfds: GT json
  c.dataset.max_image_side = 4096  # coco_folder / digits preparation
  c.dataset.digits_seed = 0
  c.dataset.digits_num_train = 3000
  c.dataset.digits_num_val = 500
  c.dataset.class_names = ()  # filled in from the training split (evaluate / predict read it)
  c.dataset.category_ids = ()
  c.dataset.input_size = 608
  c.dataset.random_resize = True
  c.dataset.sizes = tuple(range(320, 609, 32))
  c.dataset.resize_every = 10
  c.dataset.first_size = 608
  c.dataset.fixed_size_epochs = 10
  c.dataset.mixup = True
  c.dataset.no_mixup_epochs = 30
  c.dataset.max_boxes = 50
  c.dataset.max_raw_boxes = 100
  c.dataset.threads = ml_collections.config_dict.placeholder(int)
  c.dataset.augment = ml_collections.ConfigDict(
      {"flip_p": 0.5, "expand_p": 0.5, "expand_max_scale": 4.0, "affine_p": 0.5, "crop_p": 1.0})
  c.dataset.num_train_examples = -1  # -1: the length of the training split
  c.dataset.synthetic_max_objects = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.input_size = ml_collections.config_dict.placeholder(int)  # None: dataset.input_size
  c.eval.batch_size = 8
  c.eval.conf_thre = 0.001
  c.eval.nms_thre = 0.65
  c.eval.pre_nms_topk = 1000
  c.eval.max_detections = 100
  c.eval.max_images = 0  # > 0: periodic evaluation on the first N images only
  c.eval.use_ema = True

  c.model = default_model_config()
  # Backbone start (not official; the official recipe loads an ImageNet-pretrained Darknet-53):
  # a file from asff_jax.pretrain / save_backbone, merged into a fresh model (ignored on resume).
  c.model.backbone_init = ml_collections.config_dict.placeholder(str)
  # pretrain.steps > 0 (and no backbone_init): crop-classification pre-training of the backbone
  # on the training split before step 0 (asff_jax.pretrain), saved as WORKDIR/backbone_pretrain.msgpack.
  from asff_jax.pretrain import DEFAULTS as _PRETRAIN  # pylint: disable=import-outside-toplevel
  c.pretrain = ml_collections.ConfigDict(dict(_PRETRAIN))
  from asff_jax.losses import default_loss_config  # pylint: disable=import-outside-toplevel
  c.loss = default_loss_config()
  c.optimizer = optim.default_optimizer_config()
  c.schedule = optim.default_schedule_config()

  c.debug = ml_collections.ConfigDict()
  c.debug.nan_at_steps = ()  # poison the images of these steps with NaN (tests)
  c.debug.sleep_per_step = 0.0  # seconds of host sleep per step (tests of kill/resume)
  return c


def load_config_file(path) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file such as ``configs/default.py`` (what ``--config`` loads).

  Raises:
    FileNotFoundError: no such file. AttributeError: the file has no ``get_config``.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0] + "_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with ``steps_per_epoch`` and ``num_train_steps`` made concrete (> 0).

  For a real dataset (not ``'synthetic'``) the training split is opened
  (prepared on first use): ``dataset.num_train_examples`` (if ≤ 0),
  ``dataset.class_names`` and ``dataset.category_ids`` are filled in and
  ``model.num_classes`` is checked against it.

  Raises:
    ValueError: if they cannot be derived or are not positive, or the class
      count disagrees with the dataset.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    if config.dataset.source != "synthetic":
      # Real datasets: record the split size and the class names / COCO category
      # ids with the run (evaluate and predict read them from config.json).
      from asff_jax.data import loader  # pylint: disable=import-outside-toplevel
      source = loader.train_source(config)
      loader.check_num_classes(config, source)
      if int(config.dataset.num_train_examples) <= 0:
        config.dataset.num_train_examples = len(source)
      config.dataset.class_names = tuple(str(n) for n in source.class_names)
      config.dataset.category_ids = tuple(int(c) for c in source.category_ids)
    elif config.get("steps_per_epoch", -1) <= 0 and int(config.dataset.num_train_examples) <= 0:
      raise ValueError("dataset.source='synthetic' needs dataset.num_train_examples > 0")
    if config.get("steps_per_epoch", -1) <= 0:
      config.steps_per_epoch = int(config.dataset.num_train_examples) // int(config.batch_size)
    if config.steps_per_epoch <= 0:
      raise ValueError(f"steps_per_epoch resolved to {config.steps_per_epoch}: need "
                       "dataset.num_train_examples >= batch_size or an explicit steps_per_epoch")
    if config.get("num_train_steps", -1) <= 0:
      config.num_train_steps = int(config.num_epochs) * int(config.steps_per_epoch)
    if config.num_train_steps <= 0:
      raise ValueError(f"num_train_steps resolved to {config.num_train_steps}")
  return config


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """JSON-safe plain dict of ``config`` (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


# ----------------------------------------------------------------------------- data


def synthetic_batch(config, step: int, batch_size: Optional[int] = None) -> dict[str, np.ndarray]:
  """A deterministic toy batch: a pure function of ``(config.seed, step)``.

  Images ``(B, S, S, 3)`` float32 are low-amplitude noise with one flat,
  class-coloured rectangle per object; labels ``(B, dataset.max_boxes, 5)``
  hold 1..``dataset.synthetic_max_objects`` boxes ``[class, cx, cy, w, h]``
  (pixels) per image, then zero rows.
  """
  b = int(batch_size or config.batch_size)
  s = int(config.dataset.input_size)
  n_cls = int(config.model.num_classes)
  rng = np.random.default_rng([int(config.seed), int(step)])
  images = (0.1 * rng.standard_normal((b, s, s, 3))).astype(np.float32)
  labels = np.zeros((b, int(config.dataset.max_boxes), 5), np.float32)
  colours = np.random.default_rng([int(config.seed), 2**31 - 1]).uniform(-2, 2, (n_cls, 3))
  for i in range(b):
    for k in range(int(rng.integers(1, int(config.dataset.synthetic_max_objects) + 1))):
      w, h = rng.uniform(0.1, 0.6, 2) * s
      cx, cy = rng.uniform(w / 2, s - w / 2), rng.uniform(h / 2, s - h / 2)
      c = int(rng.integers(0, n_cls))
      labels[i, k] = (c, cx, cy, w, h)
      x0, x1 = int(cx - w / 2), int(cx + w / 2)
      y0, y1 = int(cy - h / 2), int(cy + h / 2)
      images[i, y0:y1, x0:x1] = colours[c]
  return {"images": images, "labels": labels}


def make_train_iterator(config, start_step: int) -> Iterator[Batch]:
  """Iterator of numpy batches from step ``start_step`` on (see the module docstring).

  Raises:
    ValueError: unknown ``dataset.source`` or a class-count mismatch
      (:func:`asff_jax.data.loader.make_train_iterator`).
  """
  if config.dataset.source == "synthetic":
    def gen():
      step = start_step
      while True:
        yield synthetic_batch(config, step)
        step += 1
    return gen()
  from asff_jax.data import loader  # pylint: disable=import-outside-toplevel
  return loader.make_train_iterator(config, start_step)


def _poison(batch: Batch, step: int, nan_steps) -> Batch:
  """``debug.nan_at_steps``: NaN images at the listed steps."""
  if step in nan_steps:
    batch = dict(batch)
    batch["images"] = np.full_like(np.asarray(batch["images"]), np.nan)
  return batch


def dropblock_for_step(config, step: int) -> Optional[tuple]:
  """The official DropBlock setting at ``step``: None or 3 × ``(block_size, keep_prob)``.

  Only with ``model.dropblock``; from ``dropblock_schedule`` (epoch boundaries,
  spec §7: none before epoch 5, [1,3,5] from 5, [3,5,7] from 80, [7,7,7] from 150).
  """
  if not config.model.get("dropblock", False):
    return None
  epoch = step // int(config.steps_per_epoch)
  sizes = None
  for start, blocks in config.dropblock_schedule:
    if epoch >= start:
      sizes = blocks
  if sizes is None:
    return None
  keep = float(config.dropblock_keep_prob)
  return tuple((int(bs), keep) for bs in sizes)


# ----------------------------------------------------------------------------- loss


def default_loss_fn() -> LossFn:
  """:func:`asff_jax.losses.loss_fn` (the official loss over the model's levels)."""
  from asff_jax import losses  # pylint: disable=import-outside-toplevel
  return losses.loss_fn


# ----------------------------------------------------------------------------- train step


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model, config, tx,
               lr_fn, loss_fn: LossFn, dropblock=None, ema_decay: float = 0.0):
  """One SGD step (pure; jit it with the state donated).

  Args:
    state: the current :class:`TrainState`.
    batch: ``{'images': (B, S, S, 3), 'labels': (B, N, 5|6)}`` (global batch).
    model, config, tx, lr_fn, loss_fn: see :func:`train_and_evaluate`.
    dropblock: static DropBlock setting (:func:`dropblock_for_step`).
    ema_decay: > 0 updates ``state.ema_params``.

  Returns:
    ``(new_state, metrics)``; metrics are scalars (among them ``cls_acc``, the
    argmax class accuracy at the positives, and ``positives_per_image``) except
    the per-level ``loss_<component>`` arrays of shape (3,).
  """
  lr = lr_fn(state.step)
  opt_state = optim.set_learning_rate(state.opt_state, lr)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(config.seed)), 1), state.step)
  extra = {"dropblock": dropblock} if dropblock is not None else {}

  def compute_loss(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    return loss_fn(variables, batch["images"], batch["labels"], model=model, config=config,
                   train=True, rng=rng, **extra)

  (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  aux = dict(aux)
  new_batch_stats = aux.pop("batch_stats")
  finite = jnp.isfinite(loss) & _all_finite(grads)

  updates, new_opt_state = tx.update(grads, opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  if ema_decay > 0:
    new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, new_params)
  else:
    new_ema = state.ema_params

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
  ema = float(config.optimizer.get("ema_decay", 0.0))
  compiled = {}

  def step_fn(state, batch, dropblock=None):
    if dropblock not in compiled:
      fn = functools.partial(train_step, model=model, config=config, tx=tx, lr_fn=lr_fn,
                             loss_fn=loss_fn, dropblock=dropblock, ema_decay=ema)
      compiled[dropblock] = jax.jit(fn, in_shardings=(repl, data), out_shardings=(repl, repl),
                                    donate_argnums=(0,))
    return compiled[dropblock](state, batch)

  return step_fn


# ----------------------------------------------------------------------------- checkpoints


def make_checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """orbax manager for ``workdir/checkpoints`` with items ``state`` and ``config``; keeps the last K."""
  options = ocp.CheckpointManagerOptions(max_to_keep=int(config.keep_checkpoints), create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               item_names=("state", "config"), options=options)


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, config) -> int:
  """Saves ``state`` (+ config JSON) under its step, unless that step exists. Returns the step."""
  step = int(shd.to_host(state.step))
  if step not in mngr.all_steps():
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            config=ocp.args.JsonSave(config_to_json_dict(config))),
              force=True)
  return step


def restore_checkpoint(mngr: ocp.CheckpointManager, abstract_state: TrainState,
                       step: Optional[int] = None) -> TrainState:
  """Restores the ``state`` item of ``step`` (default latest) into ``abstract_state``'s shardings."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


# ----------------------------------------------------------------------------- signals


class _StopFlag:
  """SIGTERM/SIGINT → flag; the loop saves and exits. Restores the old handlers on ``close``."""

  def __init__(self):
    self.requested = False
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("received signal %d: will save a checkpoint and stop after this step", signum)
    self.requested = True

  def close(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _agree(flag: bool) -> bool:
  """Any-process OR of ``flag`` (identity in a single process)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


# ----------------------------------------------------------------------------- loop


@dataclasses.dataclass
class _MetricsLog:
  """Host-side accumulation of per-step metrics between two log lines."""

  sums: dict = dataclasses.field(default_factory=dict)
  count: int = 0

  def add(self, m: Mapping[str, np.ndarray]):
    if not bool(m["finite"]):
      return
    for k, v in m.items():
      if k in ("finite", "nonfinite_count", "consecutive_nonfinite"):
        continue
      self.sums[k] = self.sums.get(k, 0.0) + np.asarray(v, np.float64)
    self.count += 1

  def scalars(self) -> dict[str, float]:
    out = {}
    if self.count:
      for k, v in self.sums.items():
        v = v / self.count
        if np.ndim(v) == 0:
          out[k if k in ("lr", "grad_norm") else f"train/{k}"] = float(v)
        else:  # per-level (3,) components: total over levels + each level
          out[f"train/{k}"] = float(np.sum(v))
          for l, x in enumerate(np.ravel(v)):
            out[f"train/{k}_l{l}"] = float(x)
    self.sums, self.count = {}, 0
    return out


PRETRAIN_FILE = "backbone_pretrain.msgpack"


def initial_backbone(config, workdir: str, *, is_main: bool = True) -> Optional[dict]:
  """The backbone a fresh run starts from, or None (random init).

  ``model.backbone_init`` (a file from :func:`asff_jax.pretrain.save_backbone`)
  wins; otherwise ``pretrain.steps > 0`` runs :func:`asff_jax.pretrain.pretrain_backbone`
  on the training split, or reuses ``WORKDIR/backbone_pretrain.msgpack`` from an
  earlier start of the same run (a run killed before its first checkpoint does
  not pre-train twice). Every process computes the same pre-training (same
  seed, same data); the main one writes the file and ``WORKDIR/pretrain.json``.

  Raises:
    FileNotFoundError / ValueError: ``model.backbone_init`` missing or not a backbone file.
  """
  from asff_jax import pretrain  # pylint: disable=import-outside-toplevel

  path = config.model.get("backbone_init", None)
  if path:
    tree = pretrain.load_backbone(path)
    logging.info("backbone initialised from %s", path)
    return dict(tree, source=str(path))
  if int(pretrain.pretrain_settings(config)["steps"]) <= 0:
    return None
  path = os.path.join(workdir, PRETRAIN_FILE)
  if os.path.exists(path):
    logging.info("backbone from the earlier pre-training %s", path)
    return dict(pretrain.load_backbone(path), source=path)
  res = pretrain.pretrain_backbone(config, log=logging.info)
  if is_main:
    pretrain.save_backbone(path, res)
    with open(os.path.join(workdir, "pretrain.json"), "w") as f:
      json.dump(res["report"], f, indent=1)
  return {"params": res["params"], "batch_stats": res["batch_stats"], "source": path}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       evaluate_fn: Optional[EvaluateFn] = None,
                       loss_fn: Optional[LossFn] = None,
                       train_iter_fn: Optional[Callable[[Any, int], Iterator[Batch]]] = None,
                       devices=None) -> TrainState:
  """Trains (resuming from ``workdir`` if it has checkpoints) and returns the final state.

  Args:
    config: full config (:func:`default_config` tree; e.g. ``configs/tiny.py``).
    workdir: output directory (created).
    evaluate_fn: hook ``evaluate_fn(state, step) -> metrics | None`` run every
      ``eval_every_steps`` and after the last step (no-op if None).
    loss_fn: ``loss_fn(variables, images, labels, *, model, config, train, rng
      [, dropblock])``; default :func:`default_loss_fn`.
    train_iter_fn: ``(config, start_step) -> iterator``; default
      :func:`make_train_iterator`.
    devices: devices of the mesh (default all).

  Returns:
    The final :class:`TrainState` (also on a signal stop).

  Raises:
    NonFiniteLossError: after ``max_consecutive_nonfinite`` skipped steps in a row.
    ValueError: bad config values (batch size vs devices, schedule, ...).
  """
  config = resolve_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))

  mesh = shd.make_mesh(devices)
  shd.check_batch_size(int(config.batch_size), mesh)
  repl = shd.replicated(mesh)
  total_steps = int(config.num_train_steps)
  size = int(config.dataset.input_size)
  input_shape = (1, size, size, 3)

  model = create_model(config)
  loss_fn = loss_fn or default_loss_fn()
  use_ema = float(config.optimizer.get("ema_decay", 0.0)) > 0
  params_shape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))["params"]
  opt = optim.make_optimizer(config, params_shape, steps_per_epoch=int(config.steps_per_epoch),
                             num_train_steps=total_steps)

  mngr = make_checkpoint_manager(workdir, config)
  latest = mngr.latest_step()
  if latest is not None:
    logging.info("resuming from %s/checkpoints/%d", workdir, latest)
    state = restore_checkpoint(mngr, abstract_train_state(model, opt.tx, input_shape, sharding=repl,
                                                          use_ema=use_ema), latest)
  else:
    init_key = jax.random.key(int(config.seed), impl=config.get("init_rng_impl", None))
    backbone = initial_backbone(config, workdir, is_main=is_main)
    init_variables = None
    if backbone is not None:
      from asff_jax.pretrain import merge_backbone  # pylint: disable=import-outside-toplevel
      init_variables = lambda: merge_backbone(
          model.init(init_key, jnp.zeros(input_shape, jnp.float32), train=False), backbone,
          backbone["source"])
    state = create_train_state(model, opt.tx, init_key, input_shape,
                               sharding=repl, use_ema=use_ema, init_variables=init_variables)
  start_step = int(shd.to_host(state.step))

  step_fn = make_train_step_fn(model=model, config=config, tx=opt.tx, lr_fn=opt.lr_fn,
                               loss_fn=loss_fn, mesh=mesh)
  writer = _make_writer(config, workdir, is_main)
  from clu import periodic_actions  # pylint: disable=import-outside-toplevel
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=int(config.log_every_steps))]
  if start_step == 0 and is_main:
    writer.write_hparams({k: v for k, v in _flat(config_to_json_dict(config)).items()})

  if evaluate_fn is None and config.dataset.source != "synthetic" and (
      int(config.eval_every_steps) > 0 or bool(config.get("eval_at_end", True))):
    from asff_jax.data import loader  # pylint: disable=import-outside-toplevel
    evaluate_fn = loader.make_evaluate_fn(config, workdir)
  data_iter = (train_iter_fn or make_train_iterator)(config, start_step)
  nan_steps = set(int(s) for s in config.debug.get("nan_at_steps", ()))
  stop = _StopFlag()
  log = _MetricsLog()
  pending: Optional[tuple[int, dict]] = None
  max_bad = int(config.max_consecutive_nonfinite)
  t_log, steps_since_log = time.time(), 0
  t_start = time.time()
  sleep = float(config.debug.get("sleep_per_step", 0.0))

  def drain():
    """Fetches the pending step's metrics, accumulates them and enforces the non-finite limit."""
    nonlocal pending
    if pending is None:
      return
    s, m = pending
    pending = None
    m = jax.tree.map(np.asarray, shd.to_host(m))
    log.add(m)
    if not bool(m["finite"]):
      logging.warning("step %d: non-finite loss or gradient (loss=%s); update skipped "
                      "(%d in a row, %d in total)", s, m["loss"], int(m["consecutive_nonfinite"]),
                      int(m["nonfinite_count"]))
      if int(m["consecutive_nonfinite"]) >= max_bad:
        mngr.wait_until_finished()
        raise NonFiniteLossError(
            f"{int(m['consecutive_nonfinite'])} consecutive steps (up to step {s}) had a non-finite "
            f"loss or gradient (max_consecutive_nonfinite={max_bad}); stopping. The last good "
            f"checkpoint is {workdir}/checkpoints/{mngr.latest_step()}.")

  try:
    step = start_step
    while step < total_steps:
      batch = _poison(next(data_iter), step, nan_steps)
      batch = shd.make_global_batch(batch, mesh, int(config.batch_size))
      state, metrics = step_fn(state, batch, dropblock_for_step(config, step))
      drain()  # the previous step's metrics: one step stays in flight
      pending = (step, metrics)
      step += 1
      steps_since_log += 1
      if sleep > 0:
        time.sleep(sleep)
      for h in hooks:
        h(step)
      is_last = step == total_steps
      do_log = step % int(config.log_every_steps) == 0 or is_last
      do_ckpt = step % int(config.checkpoint_every_steps) == 0 or is_last
      do_eval = evaluate_fn is not None and int(config.eval_every_steps) > 0 and (
          step % int(config.eval_every_steps) == 0)
      sync_every = int(config.get("preemption_sync_every_steps", 10))
      stop_now = stop.requested if jax.process_count() == 1 else (
          step % sync_every == 0 and _agree(stop.requested))
      if do_log or do_ckpt or do_eval or stop_now:
        drain()
      if do_log:
        now = time.time()
        dt = (now - t_log) / max(steps_since_log, 1)
        scalars = log.scalars()
        scalars.update({"images_per_sec": int(config.batch_size) / dt,
                        "step_time_sec": dt, "eta_hours": dt * (total_steps - step) / 3600.0,
                        "nonfinite_count": int(shd.to_host(state.nonfinite_count))})
        writer.write_scalars(step, scalars)
        logging.info("step %d/%d  loss %.4f  cls_acc %.3f  lr %.3g  %.1f img/s  ETA %.2f h", step,
                     total_steps, scalars.get("train/loss", float("nan")),
                     scalars.get("train/cls_acc", float("nan")), scalars.get("lr", float("nan")),
                     scalars["images_per_sec"], scalars["eta_hours"])
        t_log, steps_since_log = now, 0
      if do_ckpt or stop_now:
        save_checkpoint(mngr, state, config)
      if do_eval or (is_last and evaluate_fn is not None and bool(config.get("eval_at_end", True))):
        eval_metrics = evaluate_fn(state, step)
        if eval_metrics:
          writer.write_scalars(step, dict(eval_metrics))
        t_log = time.time()  # keep evaluation time out of the training images/s
      if stop_now:
        logging.warning("stopping at step %d on signal; checkpoint saved", step)
        break
    drain()
  finally:
    stop.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.flush()
  logging.info("training done at step %d in %.1f s", step, time.time() - t_start)
  return state


def _flat(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def _make_writer(config, workdir: str, is_main: bool):
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  just_logging = (not is_main) or not bool(config.get("write_tensorboard", True))
  return metric_writers.create_default_writer(workdir, just_logging=just_logging)


# ----------------------------------------------------------------------------- CLI


class _DropOrbaxInfo(logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines per save); keeps its warnings and errors."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _quiet_orbax_logs():
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropOrbaxInfo())


def main(argv=None):
  """CLI entry point (absl): parses flags and calls :func:`train_and_evaluate`."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, config.json).")
  flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
  flags.mark_flags_as_required(["config", "workdir"])
  FLAGS = flags.FLAGS

  def _run(_):
    logging.getLogger().setLevel(logging.INFO)
    _quiet_orbax_logs()
    shd.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
      train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except NonFiniteLossError as e:
      logging.error("%s", e)
      raise SystemExit(3) from e

  app.run(_run, argv=argv)


if __name__ == "__main__":
  main()
