"""Reading model variables and the saved config from a workdir (training runs or converted weights).

Layout (written by :mod:`asff_jax.train` and :mod:`asff_jax.convert`)::

    DIR/config.json                      the resolved config
    DIR/checkpoints/<step>/state/        orbax StandardSave of the state pytree
    DIR/checkpoints/<step>/config/       the same config as JSON

The ``state`` item is a plain pytree: a training state has ``params``,
``batch_stats``, ``opt_state``, ``step``, ``ema_params``...; a converted
official checkpoint only ``params`` and ``batch_stats``. Both restore with
plain orbax and no project code::

    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().restore("DIR/checkpoints/1000/state")
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config saved in ``workdir/config.json``.

  Raises:
    FileNotFoundError: if the workdir has no ``config.json``.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training or convert workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def available_steps(workdir: str) -> list[int]:
  """Steps with a complete checkpoint under ``workdir/checkpoints`` (sorted)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  mngr = ocp.CheckpointManager(d, item_names=("state", "config"))
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
  import jax  # pylint: disable=import-outside-toplevel

  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                        meta, is_leaf=is_leaf)
  return ckptr.restore(path, target)


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
    FileNotFoundError: no checkpoint (or not that step) in the workdir.
  """
  steps = available_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"checkpoint step {step} not in {workdir}/checkpoints (available: {steps})")
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  tree = restore_on_one_device(path)
  if use_ema is None:
    try:
      use_ema = bool(load_config(workdir).get("optimizer", {}).get("ema_decay", 0))
    except FileNotFoundError:
      use_ema = False
  params = tree["params"]
  if use_ema and tree.get("ema_params"):
    params = tree["ema_params"]
  to_np = lambda t: {k: to_np(v) if isinstance(v, dict) else np.asarray(v) for k, v in t.items()}
  return {"params": to_np(params), "batch_stats": to_np(tree.get("batch_stats", {}))}, step


def workdir_from_argv(argv: Sequence[str]) -> Optional[str]:
  """The value of ``--workdir`` in ``argv`` (``--workdir=D`` or ``--workdir D``), or None.

  The CLIs need it before absl parses flags: their ``--config`` default is the
  workdir's saved config, so that ``--config.key=value`` overrides work.
  """
  workdir = None
  for i, a in enumerate(argv):
    if a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
    elif a == "--workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
  return workdir
