"""End-to-end training runs of configs/tiny.py through the CLI (subprocesses).

Every run compiles the same program, so the runs share the session's persistent
JAX compilation cache and XLA's cheapest CPU codegen (both set in conftest):
only the first run pays the compile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
STEPS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  # XLA flags and the session's compilation cache come from conftest (inherited via os.environ).
  del tmp_path_factory
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _cmd(workdir, *overrides):
  return [sys.executable, "-m", "asff_jax.train", f"--config={TINY}", f"--workdir={workdir}",
          f"--config.num_train_steps={STEPS}", *overrides]


def _run(env, workdir, *overrides, timeout=200):
  return subprocess.run(_cmd(workdir, *overrides), env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)


def _steps(workdir) -> list[int]:
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _restore(workdir, step):
  """Plain orbax, no project code: the 'state' and 'config' items as saved."""
  mngr = ocp.CheckpointManager(Path(workdir) / "checkpoints", item_names=("state", "config"))
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                   config=ocp.args.JsonRestore()))
  mngr.close()
  return out["state"], out["config"]


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_close(a, b, atol=1e-6):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def _wait_for(pred, proc, timeout):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if pred():
      return True
    if proc.poll() is not None:
      return pred()
    time.sleep(0.1)
  return False


@pytest.fixture(scope="module")
def reference_run(env, tmp_path_factory):
  """Uninterrupted run of STEPS steps (the first, cold-compile run)."""
  workdir = tmp_path_factory.mktemp("reference")
  r = _run(env, workdir)
  assert r.returncode == 0, r.stderr[-5000:]
  return workdir, r


def test_run_writes_config_checkpoints_and_logs(reference_run):
  workdir, r = reference_run
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["num_train_steps"] == STEPS and cfg["steps_per_epoch"] == 2 and cfg["batch_size"] == 4
  assert cfg["optimizer"]["lr"] == 0.01  # every key present, overrides applied
  assert _steps(workdir) == [4, 6, 8]  # every 2 steps, keep_checkpoints=3
  state, saved_cfg = _restore(workdir, 8)
  assert saved_cfg == cfg
  assert int(state["step"]) == STEPS and int(state["nonfinite_count"]) == 0
  assert set(state) >= {"params", "batch_stats", "opt_state", "step"}
  assert state["params"]["backbone"]["layer_0"]["conv"]["kernel"].dtype == np.float32
  assert list(workdir.glob("events.out.tfevents*")), "no TensorBoard event file"
  logged = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged if "train/loss" in m] == [2, 4, 6, 8]  # every log_every_steps
  assert all("images_per_sec" in m and "train/loss_obj_l0" in m for m in logged if "train/loss" in m)
  # the console shows the progress line, not the per-component losses
  assert "loss_obj_l0" not in r.stderr + r.stdout and "train: 8/8" in r.stderr
  # where the wall time went: the parts are measured, and together they are the run's wall time
  timing = [m for m in logged if "time/total_s" in m]
  assert len(timing) == 1 and timing[0]["step"] == STEPS
  parts = {k: v for k, v in timing[0].items() if k.startswith("time/") and k != "time/total_s"}
  assert set(parts) == {f"time/{k}_s" for k in ("setup", "compile", "input", "steps", "evaluation",
                                                 "checkpoint")}
  assert min(parts.values()) >= 0 and parts["time/compile_s"] > 0 and parts["time/steps_s"] > 0
  assert 0.8 * timing[0]["time/total_s"] <= sum(parts.values()) <= timing[0]["time/total_s"]
  assert "time: setup" in r.stderr + r.stdout


def test_sigkill_and_sigterm_then_resume_matches_uninterrupted(env, reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  slow = "--config.debug.sleep_per_step=0.5"
  # 1) SIGKILL once the step-2 checkpoint is complete.
  p = subprocess.Popen(_cmd(workdir, slow), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  try:
    assert _wait_for(lambda: 2 in _steps(workdir), p, 120), "no checkpoint 2 before timeout/exit"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
  finally:
    if p.poll() is None:
      p.kill()
  killed_at = _steps(workdir)
  assert killed_at and max(killed_at) < STEPS, killed_at
  # 2) resume; SIGTERM once a later checkpoint exists: saves and exits cleanly.
  p = subprocess.Popen(_cmd(workdir, slow), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
  try:
    assert _wait_for(lambda: max(_steps(workdir)) > max(killed_at), p, 120)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, err[-3000:]
  assert f"resuming from {workdir}/checkpoints/{max(killed_at)}" in err
  assert "stopping at step" in err
  term_at = max(_steps(workdir))
  assert max(killed_at) < term_at < STEPS, (killed_at, term_at)
  # 3) resume to the end: identical to the uninterrupted run.
  r = _run(env, workdir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming from {workdir}/checkpoints/{term_at}" in r.stderr
  got, _ = _restore(workdir, STEPS)
  want, _ = _restore(ref_dir, STEPS)
  for key in ("params", "batch_stats", "opt_state"):
    _assert_trees_close(got[key], want[key])


def test_nonfinite_steps_are_skipped_then_stop(env, reference_run, tmp_path):
  del reference_run  # only for the compile cache
  workdir = tmp_path / "nan"
  # NaN at step 1 (skipped, training recovers at step 2), then 3 in a row (3, 4, 5) → stop.
  r = _run(env, workdir, "--config.debug.nan_at_steps=(1, 3, 4, 5)", "--config.checkpoint_every_steps=1",
           "--config.keep_checkpoints=20", "--config.max_consecutive_nonfinite=3")
  assert r.returncode == 3, r.stderr[-3000:]
  assert "3 consecutive steps" in r.stderr and "max_consecutive_nonfinite=3" in r.stderr
  assert "non-finite loss or gradient" in r.stderr
  steps = _steps(workdir)
  assert max(steps) < 7, steps  # stopped before the end; nothing written after the streak
  s = {k: _restore(workdir, k)[0] for k in (1, 2, 3, max(steps))}
  # the NaN step (batch 1 → state step 2) changed nothing but the counters
  for key in ("params", "batch_stats"):
    _assert_trees_close(s[2][key], s[1][key], atol=0)
  _assert_trees_close(s[2]["opt_state"]["inner_state"], s[1]["opt_state"]["inner_state"], atol=0)
  assert int(s[2]["nonfinite_count"]) == 1 and int(s[2]["consecutive_nonfinite"]) == 1
  # batch 2 is finite: the update happens and the streak resets
  assert any(np.max(np.abs(a - b)) > 0 for a, b in zip(_leaves(s[3]["params"]), _leaves(s[2]["params"])))
  assert int(s[3]["consecutive_nonfinite"]) == 0
  # the last checkpoint holds the last good params
  _assert_trees_close(s[max(steps)]["params"], s[3]["params"], atol=0)
  assert all(np.all(np.isfinite(x)) for x in _leaves(s[max(steps)]["params"]))
