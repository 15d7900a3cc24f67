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
import sys
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
  tree = ocp.StandardCheckpointer().restore(path)
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


def config_from_workdir_and_flags(argv: Sequence[str], flag_name: str = "config"):
  """Defines ``--config`` defaulting to ``WORKDIR/config.json`` so ``--config.key=value`` overrides work.

  Reads ``--workdir`` from ``argv`` before absl parses flags (the default config
  depends on it). Returns the workdir, or None if ``--workdir`` is absent.
  """
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  workdir = None
  for i, a in enumerate(argv):
    if a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
    elif a == "--workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
  base = load_config(workdir) if workdir and os.path.exists(os.path.join(workdir, "config.json")) \
      else ml_collections.ConfigDict()
  config_flags.DEFINE_config_dict(flag_name, base, "config (default: the workdir's config.json)",
                                  lock_config=False)
  return workdir


def _argv() -> list[str]:
  return list(sys.argv)
