"""SyncBN / data parallelism: 8 fake CPU devices and 2 processes give the 1-device result.

Both run ``configs/tiny.py`` (synthetic data, a pure function of (seed, step))
in subprocesses, because the device count and ``jax.distributed`` must be set
before JAX starts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
STEPS = 3
BATCH = 8
# The official LR (tiny.py uses 0.01 so that its few steps move the weights a lot). Runs on
# 1 and 8 devices differ only in float reduction order (BN statistics, gradient all-reduce);
# with the summed official loss that noise grows with the LR: ~1e-4 after 3 steps at 0.01,
# ~1e-5 at 0.001. Per-device (unsynced) BN statistics would differ by ~1e-1.
LR = 0.001


def _env(devices: int, cache: Path, fast_compile: bool = True) -> dict:
  """Subprocess environment. ``fast_compile=False``: XLA's default CPU codegen. The 1-vs-8-device
  comparison needs it: with LLVM -O0 the 8-device step differs from the 1-device one by ~3e-4
  relative in the first conv's update (measured), at the default level by ~5e-7 after 3 steps."""
  opt = " --xla_backend_optimization_level=0" if fast_compile else ""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}{opt}",
              TF_CPP_MIN_LOG_LEVEL="3",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _restore(workdir: Path, step: int) -> dict:
  """Plain orbax onto this (1-device) process, whatever topology saved it: target from metadata."""
  import jax  # pylint: disable=import-outside-toplevel
  path = workdir / "checkpoints" / str(step) / "state"
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path).item_metadata.tree
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return ckptr.restore(path, target)




def _max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=import-outside-toplevel  (after the module's env setup)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))


def _assert_close(a, b, atol):
  worst = _max_abs_diff(a, b)
  assert worst <= atol, worst


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, cache):
  """Reference: one process, one device, global batch BATCH."""
  workdir = tmp_path_factory.mktemp("one_device")
  r = subprocess.run([sys.executable, "-m", "asff_jax.train", f"--config={TINY}",
                      f"--workdir={workdir}", f"--config.num_train_steps={STEPS}",
                      f"--config.batch_size={BATCH}", "--config.checkpoint_every_steps=1",
                      f"--config.keep_checkpoints={STEPS}", f"--config.optimizer.lr={LR}"],
                     env=_env(1, cache, fast_compile=False), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-4000:]
  return workdir


def test_eight_devices_equal_one_device(tmp_path, cache, single_device_run):
  """Data parallel over a Mesh of 8 devices: same params and BN statistics (SyncBN) as 1 device."""
  workdir = tmp_path / "eight"
  script = textwrap.dedent(f"""
      import jax
      assert jax.device_count() == 8, jax.devices()
      from ml_collections import config_flags
      import importlib.util
      spec = importlib.util.spec_from_file_location("tiny", {TINY!r})
      mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
      config = mod.get_config()
      config.num_train_steps = {STEPS}
      config.batch_size = {BATCH}
      config.checkpoint_every_steps = {STEPS}
      config.optimizer.lr = {LR}
      from asff_jax.train import train_and_evaluate
      state = train_and_evaluate(config, {str(workdir)!r})
      # the state really is laid out over the 8-device mesh
      leaf = jax.tree.leaves(state.params)[0]
      assert len(leaf.sharding.device_set) == 8, leaf.sharding
      print("OK")
  """)
  r = subprocess.run([sys.executable, "-c", script], env=_env(8, cache, fast_compile=False), capture_output=True,
                     text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
  got, want = _restore(workdir, STEPS), _restore(single_device_run, STEPS)
  _assert_close(got["params"], want["params"], 1e-5)
  _assert_close(got["batch_stats"], want["batch_stats"], 1e-5)
  # the project's loader (evaluate / predict) reads the 8-device checkpoint on 1 device
  from asff_jax.training import checkpoints  # pylint: disable=import-outside-toplevel
  variables, step = checkpoints.load_variables(str(workdir))
  assert step == STEPS
  _assert_close(variables["params"], want["params"], 1e-5)
  # and training did move the weights (the comparison is not between two initialisations)
  init_diff = [np.max(np.abs(np.asarray(x))) for x in
               __import__("jax").tree.leaves(want["opt_state"]["inner_state"])
               if np.ndim(x) > 0]
  assert max(init_diff) > 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path, cache, single_device_run):
  """2 processes × 2 CPU devices on 127.0.0.1 (gloo collectives) = 1 process, same global batch."""
  workdir = tmp_path / "two_procs"
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "asff_jax.train", f"--config={TINY}", f"--workdir={workdir}",
           f"--config.num_train_steps={STEPS}", f"--config.batch_size={BATCH}",
           f"--config.checkpoint_every_steps={STEPS}", f"--config.optimizer.lr={LR}",
           f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={pid}"]
    procs.append(subprocess.Popen(cmd, env=_env(2, cache), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=REPO))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=900))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert "process_count=2" in outs[0][1] or "num_processes=2" in outs[0][1]
  got, want = _restore(workdir, STEPS), _restore(single_device_run, STEPS)
  # SyncBN across processes: the forward statistics agree to ~2e-6 (measured); per-process
  # statistics over 4 of the 8 images would differ by > 1e-2.
  _assert_close(got["batch_stats"], want["batch_stats"], 1e-4)
  # Parameters, against the size of the last step's update (the only full-LR step: tiny's
  # burn-in gives steps 0 and 1 an LR of 0 and LR/16). Measured 2026-12-06: the first
  # gradient of the 2-process program differs from the 1-process one by 1-2 % relative in
  # every layer up to neck layer_23's 3x3 conv (its input gradient), ~1e-5 above it; the
  # BN statistics agree. It depends on XLA:CPU's code generation (0.6 % of the update
  # after the third step with the default LLVM level here; 0.01 % with -O0 here, 0.6 %
  # with -O0 on the CI machine) and is not reproduced by 4 devices in one process
  # (1.5e-5). A wrong row split or a missing cross-process gradient all-reduce changes
  # the update by tens of percent.
  update = _max_abs_diff(want["params"], _restore(single_device_run, STEPS - 1)["params"])
  assert update > 1e-3, update  # the step really moved the weights
  assert _max_abs_diff(got["params"], want["params"]) <= 0.05 * update
