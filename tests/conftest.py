"""Shared test helpers: the parity fixture location and cheap variable construction."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# ../shared/parity relative to the repository root (CI clones the repo beside shared/).
PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def parity_file(name: str) -> Path:
  """Path of a parity fixture file; skips the test (with the reason) if it is absent."""
  path = PARITY_DIR / name
  if not path.exists():
    pytest.skip(f"parity fixture {path} not found (expected ../shared/parity beside the repo)")
  return path


def random_variables(model, input_hw=(64, 64), seed=0, scale=0.05):
  """Random variables of the right structure without running a full ``init``.

  Structure comes from ``jax.eval_shape``; values are cheap numpy normals
  (BN variances positive), so even full-width models are built in ~1 s.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_hw, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def make(path, sds):
    name = path[-1].key
    if name == "var":
      return np.ones(sds.shape, np.float32)
    if name == "scale":
      return np.ones(sds.shape, np.float32)
    if name in ("mean", "bias"):
      return np.zeros(sds.shape, np.float32)
    fan_in = int(np.prod(sds.shape[:-1]))
    return (rng.standard_normal(sds.shape) * np.sqrt(1.0 / max(fan_in, 1))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)
