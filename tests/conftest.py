"""Shared test helpers: the parity fixture location and cheap variable construction."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Compile-time savings for the whole session, set before JAX creates its backend so that they
# also reach every subprocess the tests start (CLI runs, distributed workers):
# * one persistent compilation cache per session: the many tests that build the same tiny
#   model, and the CLI subprocesses that compile the same train step, compile it once;
# * XLA's cheapest CPU codegen (LLVM -O0): the tests' programs are tiny, so compile time
#   dominates; HLO-level rewrites (and so the numerics the parity tests check) are unchanged.
# A caller's own settings of these variables win.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="asff_jax_tests_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402  pylint: disable=wrong-import-position

# Random variables of the right structure without compiling ``init`` (re-exported for tests).
from asff_jax.models import random_variables  # noqa: F401,E402  pylint: disable=unused-import

# ../shared/parity relative to the repository root (CI clones the repo beside shared/).
PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity"


def parity_file(name: str) -> Path:
  """Path of a parity fixture file; skips the test (with the reason) if it is absent."""
  path = PARITY_DIR / name
  if not path.exists():
    pytest.skip(f"parity fixture {path} not found (expected ../shared/parity beside the repo)")
  return path


def tiny_config():
  """``configs/tiny.py``'s config."""
  from asff_jax.config import load_config_file  # pylint: disable=import-outside-toplevel

  return load_config_file(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def write_tiny_digits_config(tmp_path, *, num_train: int, num_val: int, **settings) -> Path:
  """Writes ``tmp_path/tiny_digits.py``: ``configs/tiny.py`` on a tiny generated digits set.

  The dataset and its TFDS preparation live under ``tmp_path``; ``settings``
  are extra ``dotted.key=value`` assignments (e.g. ``num_train_steps=2``).
  """
  repo = Path(__file__).resolve().parents[1]
  lines = ["import sys", f"sys.path.insert(0, {str(repo)!r})", "from asff_jax.config import load_config_file",
           "def get_config():", f"  c = load_config_file({str(repo / 'configs' / 'tiny.py')!r})",
           "  c.dataset.source = 'digits'", f"  c.dataset.root = {str(Path(tmp_path) / 'digits')!r}",
           f"  c.dataset.data_dir = {str(Path(tmp_path) / 'tfds')!r}",
           f"  c.dataset.digits_num_train = {int(num_train)}", f"  c.dataset.digits_num_val = {int(num_val)}",
           "  c.dataset.max_boxes = 12", "  c.model.num_classes = 10", "  c.eval_at_end = True"]
  lines += [f"  c.{k.replace('__', '.')} = {v!r}" for k, v in settings.items()]
  lines.append("  return c")
  path = Path(tmp_path) / "tiny_digits.py"
  path.write_text("\n".join(lines) + "\n")
  return path


def experiment_script(name: str):
  """``experiments/<name>.py`` imported as a module (the scripts are not a package)."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def trace_train_step(config):
  """The real train step of ``config`` traced with ``jax.eval_shape`` (nothing compiled or run).

  Builds what ``train_and_evaluate`` builds — the resolved config (dataset facts), the model, the
  optimizer, the step function and one real global batch from the training input pipeline — with an
  abstract state. Returns ``(state, new_state, metrics, model)``: ``state`` and ``new_state`` are
  ``TrainState`` trees of ``jax.ShapeDtypeStruct``, ``metrics`` the step's metrics (shapes, dtypes).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from asff_jax.config import resolve_config  # pylint: disable=import-outside-toplevel
  from asff_jax.data import loader  # pylint: disable=import-outside-toplevel
  from asff_jax.models import create_model, losses  # pylint: disable=import-outside-toplevel
  from asff_jax.training import optim  # pylint: disable=import-outside-toplevel
  from asff_jax.training import sharding as shd  # pylint: disable=import-outside-toplevel
  from asff_jax.training.state import abstract_train_state  # pylint: disable=import-outside-toplevel
  from asff_jax.training.step import make_train_step_fn  # pylint: disable=import-outside-toplevel

  cfg = resolve_config(config, **loader.dataset_info(loader.train_source(config)))
  model = create_model(cfg)
  mesh = shd.make_mesh()
  shape = (1, int(cfg.dataset.input_size), int(cfg.dataset.input_size), 3)
  pshape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
  opt = optim.make_optimizer(cfg, pshape)
  state = abstract_train_state(model, opt.tx, shape, sharding=shd.replicated(mesh))
  step = make_train_step_fn(model=model, config=cfg, tx=opt.tx, lr_fn=lambda s: jnp.float32(0.01),
                            loss_fn=losses.loss_fn, mesh=mesh)
  batch = shd.make_global_batch(next(loader.make_train_iterator(cfg, 0)), mesh, cfg.batch_size)
  new_state, metrics = jax.eval_shape(step, state, batch)
  return state, new_state, metrics, model
