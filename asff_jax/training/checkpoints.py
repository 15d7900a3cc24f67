"""Checkpoints: writing and reading workdirs (training runs and converted weights).

Layout::

    DIR/config.json                      the resolved config
    DIR/checkpoints/<step>/state/        orbax StandardSave of the state pytree
    DIR/checkpoints/<step>/config/       the same config as JSON

The ``state`` item is a plain pytree: a training state
(:class:`~asff_jax.training.state.TrainState`) has ``params``,
``batch_stats``, ``opt_state``, ``step``, ``ema_params``, ...; a converted
official checkpoint only ``params`` and ``batch_stats``. Both restore with
plain orbax and no project code::

    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().restore("DIR/checkpoints/1000/state")

orbax writes every step into a temporary folder and renames it when complete,
so a killed run never leaves a half-written checkpoint behind; the latest
complete one is what a restart resumes from.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from asff_jax import config as config_lib
from asff_jax.errors import MissingFileError

ITEMS = ("state", "config")


def make_manager(workdir: str, keep: Optional[int] = None) -> ocp.CheckpointManager:
  """orbax manager for ``workdir/checkpoints`` with items ``state`` and ``config``; keeps the last ``keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               item_names=ITEMS, options=options)


def save(mngr: ocp.CheckpointManager, step: int, tree, config) -> int:
  """Saves ``tree`` (a TrainState or ``{'params', 'batch_stats'}``) and the config under ``step``.

  Does nothing if that step exists already. Asynchronous: call
  ``mngr.wait_until_finished()`` before reading it back. Returns the step.
  """
  step = int(step)
  if step not in mngr.all_steps():
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        config=ocp.args.JsonSave(config_lib.config_to_json_dict(config))), force=True)
  return step


def restore(mngr: ocp.CheckpointManager, abstract_tree, step: Optional[int] = None):
  """Restores the ``state`` item of ``step`` (default latest) into ``abstract_tree``'s shapes and shardings."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree)))
  return restored["state"]


def write_workdir(out_dir: str, variables, config, step: int = 0) -> str:
  """A workdir holding ``variables`` as checkpoint ``step`` and ``config`` (what ``convert`` writes).

  ``evaluate``, ``predict``, ``export`` and :class:`asff_jax.Detector` read it
  like a training workdir. Returns the absolute path.
  """
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  config_lib.write_config_json(config, os.path.join(out_dir, "config.json"))
  mngr = make_manager(out_dir)
  save(mngr, step, jax.tree.map(np.asarray, variables), config)
  mngr.wait_until_finished()
  mngr.close()
  return out_dir


def available_steps(workdir: str) -> list[int]:
  """Steps with a complete checkpoint under ``workdir/checkpoints`` (sorted)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  mngr = ocp.CheckpointManager(d, item_names=ITEMS)
  steps = sorted(mngr.all_steps())
  mngr.close()
  return steps


def restore_on_one_device(path: str):
  """Restores an orbax ``StandardSave`` pytree onto this process's first device, whatever mesh saved it.

  A checkpoint written by an 8-device or multi-host run records its shardings;
  restoring without a target fails on another topology. The target here is
  built from the checkpoint's own metadata (shapes, dtypes) with a
  single-device sharding. Plain orbax does the same with
  ``StandardCheckpointer().restore(path, target)``.
  """
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                        meta, is_leaf=is_leaf)
  return ckptr.restore(path, target)


def checkpoint_path(workdir: str, step: Optional[int] = None) -> tuple[str, int]:
  """``(path of the state item, step)`` of checkpoint ``step`` (default: the latest complete one).

  Raises:
    MissingFileError: the workdir has no checkpoint, or not that step.
  """
  steps = available_steps(workdir)
  if not steps:
    raise MissingFileError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}: train "
                           "first, or convert official weights with python -m asff_jax.convert")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise MissingFileError(f"checkpoint step {step} not in {workdir}/checkpoints (available: {steps})")
  return os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state"), int(step)


def variables_of(tree, use_ema: bool) -> dict:
  """``{'params', 'batch_stats'}`` (numpy) of a restored state tree; the EMA params if asked and present."""
  params = tree["params"]
  if use_ema and tree.get("ema_params"):
    params = tree["ema_params"]
  return {"params": jax.tree.map(np.asarray, params),
          "batch_stats": jax.tree.map(np.asarray, tree.get("batch_stats", {}))}


def load_variables(workdir: str, step: Optional[int] = None, *, use_ema: Optional[bool] = None):
  """Model variables ``{'params', 'batch_stats'}`` (numpy) of checkpoint ``step`` (default latest).

  Args:
    workdir: a training or convert workdir.
    step: checkpoint step; None = the latest complete one.
    use_ema: take the EMA parameters when the state has them (default: when
      the saved config enables EMA).

  Returns:
    ``(variables, step)``.

  Raises:
    MissingFileError: no checkpoint (or not that step) in the workdir.
  """
  path, step = checkpoint_path(workdir, step)
  tree = restore_on_one_device(path)
  if use_ema is None:
    cfg = os.path.join(workdir, "config.json")
    use_ema = os.path.exists(cfg) and float(config_lib.load_workdir_config(workdir).optimizer.ema_decay) > 0
  return variables_of(tree, use_ema), step
