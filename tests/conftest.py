"""Shared test helpers: the parity fixture location and cheap variable construction."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared/parity relative to the repository root (CI clones the repo beside shared/).
PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def parity_file(name: str) -> Path:
  """Path of a parity fixture file; skips the test (with the reason) if it is absent."""
  path = PARITY_DIR / name
  if not path.exists():
    pytest.skip(f"parity fixture {path} not found (expected ../shared/parity beside the repo)")
  return path


def random_variables(model, input_hw=(64, 64), seed=0):
  """Random variables of the right structure (see :func:`asff_jax.models.random_variables`)."""
  from asff_jax.models import random_variables as _rv  # pylint: disable=import-outside-toplevel

  return _rv(model, input_hw, seed)


def tiny_config():
  """``configs/tiny.py``'s config."""
  from asff_jax.train import load_config_file  # pylint: disable=import-outside-toplevel

  return load_config_file(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
