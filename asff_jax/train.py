"""The training loop and its command line (spec §7): ``jax.jit`` over a data-parallel ``Mesh``.

::

    python -m asff_jax.train --config configs/default.py --workdir DIR [--config.key=value ...]
    # several hosts: one command per process (omit on one host, under Slurm / Open MPI, on TPU pods)
    python -m asff_jax.train ... --coordinator_address=HOST:PORT --num_processes=2 --process_id=0

Library use: :func:`train_and_evaluate` ``(config, workdir) -> TrainState``.

What the workdir holds: ``config.json`` (the resolved config), ``checkpoints/<step>/``
(:mod:`asff_jax.training.checkpoints`), ``metrics.jsonl`` (every logged
scalar, one line per log step), TensorBoard event files, and ``eval/``
(:mod:`asff_jax.evaluation.evaluator`). A run started again with the same
workdir resumes from its latest complete checkpoint; SIGTERM / SIGINT save one
and exit cleanly. The batch of step s is a pure function of (seed, s)
(:mod:`asff_jax.data.pipeline`), so a resumed run equals an uninterrupted one.

Console: one progress line (step, loss, class accuracy, images/s, ETA), the
periodic evaluations, and at the end a table of the final metrics and where
the checkpoint, metrics and logs are. The per-component losses go to
TensorBoard and ``metrics.jsonl`` only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import signal
import threading
import time
from typing import Callable, Iterator, Mapping, Optional

from asff_jax import cli  # first: quiets TensorFlow before it is imported

import jax  # noqa: E402  pylint: disable=wrong-import-order
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from clu import metric_writers  # noqa: E402

from asff_jax import config as config_lib  # noqa: E402
from asff_jax import progress  # noqa: E402
from asff_jax.data import loader  # noqa: E402
from asff_jax.evaluation import evaluator  # noqa: E402
from asff_jax.models import create_model, losses  # noqa: E402
from asff_jax.training import checkpoints, optim, warm_start  # noqa: E402
from asff_jax.training import sharding as shd  # noqa: E402
from asff_jax.training.state import TrainState, abstract_train_state, create_train_state  # noqa: E402
from asff_jax.training.step import dropblock_for_step, make_train_step_fn  # noqa: E402

logger = logging.getLogger("asff_jax")
Batch = Mapping[str, np.ndarray]
EvaluateFn = Callable[[dict, int], Optional[Mapping[str, float]]]


class NonFiniteLossError(RuntimeError):
  """``max_consecutive_nonfinite`` consecutive steps had a non-finite loss or gradient."""


class _StopFlag:
  """SIGTERM/SIGINT → flag; the loop saves and exits. Restores the old handlers on ``close``."""

  def __init__(self):
    self.requested = False
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logger.warning("received signal %d: will save a checkpoint and stop after this step", signum)
    self.requested = True

  def close(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _agree(flag: bool) -> bool:
  """Any-process OR of ``flag`` (identity in a single process)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel  (multi-host only)
  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


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


class _Writer:
  """Scalars to TensorBoard (main process, ``write_tensorboard``) and to ``metrics.jsonl``."""

  def __init__(self, config, workdir: str, is_main: bool):
    self._tb = (metric_writers.SummaryWriter(workdir)
                if is_main and bool(config.write_tensorboard) else None)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if is_main else None  # noqa: SIM115

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._tb is not None:
      self._tb.write_scalars(step, dict(scalars))
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _poison(batch: Batch, step: int, nan_steps) -> Batch:
  """``debug.nan_at_steps``: NaN images at the listed steps."""
  if step in nan_steps:
    batch = dict(batch)
    batch["images"] = np.full_like(np.asarray(batch["images"]), np.nan)
  return batch


def _warm_start(state: TrainState, config, sharding, is_main: bool) -> TrainState:
  """The step-0 state with ``config.init.checkpoint`` laid over its variables (and EMA)."""
  variables, report = warm_start.warm_start(shd.to_host(state.variables), config)
  if is_main:
    logger.info("%s", report)
  variables = jax.device_put(variables, sharding)
  ema = jax.tree.map(jnp.copy, variables["params"]) if state.ema_params else state.ema_params
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                       ema_params=ema)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       evaluate_fn: Optional[EvaluateFn] = None,
                       train_iter_fn: Optional[Callable[[object, int], Iterator[Batch]]] = None,
                       devices=None, show_progress: bool = True) -> TrainState:
  """Trains (resuming from ``workdir`` if it has checkpoints) and returns the final state.

  Args:
    config: full config (:func:`asff_jax.config.default_config` tree; e.g. ``configs/tiny.py``).
    workdir: output directory (created).
    evaluate_fn: ``evaluate_fn(variables, step) -> metrics | None`` run every
      ``eval_every_steps`` and after the last step (default: COCO evaluation on
      ``dataset.eval_split``, :func:`asff_jax.evaluation.evaluator.make_evaluate_fn`).
    train_iter_fn: ``(config, start_step) -> iterator`` of numpy batches
      ``{'images': (B, S, S, 3), 'labels': (B, N, 5|6)}`` (the global batch or
      this process's share); default :func:`asff_jax.data.loader.make_train_iterator`.
    devices: devices of the mesh (default all).
    show_progress: the progress line on the console.

  Returns:
    The final :class:`~asff_jax.training.state.TrainState` (also on a signal stop).

  Raises:
    NonFiniteLossError: after ``max_consecutive_nonfinite`` skipped steps in a row.
    ConfigError: bad config values (batch size vs devices, schedule, class count, ...).
  """
  t_start = time.time()
  source = loader.train_source(config)
  config = config_lib.resolve_config(config, **loader.dataset_info(source))
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    config_lib.write_config_json(config, os.path.join(workdir, "config.json"))
    for message in config_lib.schedule_fit_messages(config):
      logger.warning("%s", message)
    crowded = loader.crowding_message(source, config)
    if crowded:
      logger.warning("%s", crowded)

  mesh = shd.make_mesh(devices)
  shd.check_batch_size(int(config.batch_size), mesh)
  repl = shd.replicated(mesh)
  total_steps = int(config.num_train_steps)
  size = int(config.dataset.input_size)
  input_shape = (1, size, size, 3)

  model = create_model(config)
  use_ema = float(config.optimizer.ema_decay) > 0
  params_shape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))["params"]
  opt = optim.make_optimizer(config, params_shape)

  mngr = checkpoints.make_manager(workdir, int(config.keep_checkpoints))
  latest = mngr.latest_step()
  if latest is not None:
    logger.info("resuming from %s/checkpoints/%d", workdir, latest)
    if config.init.checkpoint:
      logger.info("init.checkpoint=%s ignored: the resumed state already holds the loaded weights",
                  config.init.checkpoint)
    state = checkpoints.restore(mngr, abstract_train_state(model, opt.tx, input_shape, sharding=repl,
                                                           use_ema=use_ema), latest)
  else:
    init_key = jax.random.key(int(config.seed), impl=config.init_rng_impl)
    state = create_train_state(model, opt.tx, init_key, input_shape, sharding=repl, use_ema=use_ema)
    if config.init.checkpoint:
      state = _warm_start(state, config, repl, is_main)
  start_step = int(shd.to_host(state.step))

  step_fn = make_train_step_fn(model=model, config=config, tx=opt.tx, lr_fn=opt.lr_fn,
                               loss_fn=losses.loss_fn, mesh=mesh)
  writer = _Writer(config, workdir, is_main)
  if evaluate_fn is None and (int(config.eval_every_steps) > 0 or bool(config.eval_at_end)):
    evaluate_fn = evaluator.make_evaluate_fn(config, workdir)
  if train_iter_fn is None:
    data_iter = loader.make_train_iterator(config, start_step, source=source)
  else:
    data_iter = train_iter_fn(config, start_step)
  nan_steps = set(int(s) for s in config.debug.nan_at_steps)
  stop = _StopFlag()
  log = _MetricsLog()
  pending: Optional[tuple[int, dict]] = None
  max_bad = int(config.max_consecutive_nonfinite)
  sleep = float(config.debug.sleep_per_step)
  bar = progress.bar(total_steps, "train", unit="step", initial=start_step,
                     enabled=show_progress and is_main)
  t_log, steps_since_log = time.time(), 0
  last_eval: dict = {}
  timers = _Timers(setup=time.time() - t_start)

  def drain():
    """Fetches the pending step's metrics, accumulates them and enforces the non-finite limit."""
    nonlocal pending
    if pending is None:
      return
    s, m = pending
    pending = None
    t0 = time.time()
    m = jax.tree.map(np.asarray, shd.to_host(m))  # waits for the step: its time counts as steps
    timers.steps += time.time() - t0
    log.add(m)
    if not bool(m["finite"]):
      logger.warning("step %d: non-finite loss or gradient (loss=%s); update skipped "
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
      t0 = time.time()
      batch = _poison(next(data_iter), step, nan_steps)
      batch = shd.make_global_batch(batch, mesh, int(config.batch_size))
      t1 = time.time()
      state, metrics = step_fn(state, batch, dropblock_for_step(config, step))
      timers.add_step(t1 - t0, time.time() - t1, first=step == start_step)
      drain()  # the previous step's metrics: one step stays in flight
      pending = (step, metrics)
      step += 1
      steps_since_log += 1
      bar.update(1)
      if sleep > 0:
        time.sleep(sleep)
      is_last = step == total_steps
      do_log = step % int(config.log_every_steps) == 0 or is_last
      do_ckpt = step % int(config.checkpoint_every_steps) == 0 or is_last
      do_eval = evaluate_fn is not None and int(config.eval_every_steps) > 0 and (
          step % int(config.eval_every_steps) == 0)
      stop_now = stop.requested if jax.process_count() == 1 else (
          step % int(config.preemption_sync_every_steps) == 0 and _agree(stop.requested))
      if do_log or do_ckpt or do_eval or stop_now:
        drain()
      if do_log:
        now = time.time()
        dt = (now - t_log) / max(steps_since_log, 1)
        scalars = log.scalars()
        scalars.update({"images_per_sec": int(config.batch_size) / dt, "step_time_sec": dt,
                        "eta_hours": dt * (total_steps - step) / 3600.0,
                        "nonfinite_count": int(shd.to_host(state.nonfinite_count))})
        writer.write(step, scalars)
        bar.set_postfix_str(f"loss {scalars.get('train/loss', float('nan')):.3f}  cls_acc "
                            f"{scalars.get('train/cls_acc', float('nan')):.2f}  "
                            f"{scalars['images_per_sec']:.1f} img/s")
        t_log, steps_since_log = now, 0
      if do_ckpt or stop_now:
        t0 = time.time()
        checkpoints.save(mngr, int(shd.to_host(state.step)), state, config)
        timers.checkpoint += time.time() - t0
      if do_eval or (is_last and evaluate_fn is not None and bool(config.eval_at_end)):
        t0 = time.time()
        params = state.ema_params if (config.eval.use_ema and state.ema_params) else state.params
        eval_metrics = evaluate_fn(shd.to_host({"params": params, "batch_stats": state.batch_stats}), step)
        if eval_metrics:
          writer.write(step, dict(eval_metrics))
          last_eval = dict(eval_metrics)
        t_log = time.time()  # keep evaluation time out of the training images/s
        timers.evaluation += t_log - t0
      if stop_now:
        logger.warning("stopping at step %d on signal; checkpoint saved", step)
        break
    drain()
  finally:
    bar.close()
    stop.close()
    t0 = time.time()
    mngr.wait_until_finished()
    mngr.close()
    timers.checkpoint += time.time() - t0
    if step > start_step:
      writer.write(step, timers.scalars(time.time() - t_start))
    writer.close()
  if is_main:
    logger.info("%s", _summary(step, time.time() - t_start, workdir, last_eval, timers))
  return state


class _Timers:
  """Where the wall time of a run went (seconds), written as ``time/*`` to metrics.jsonl at the end.

  ``setup``: from the call to the first step (dataset preparation, resolving the config, model
  init or checkpoint restore); ``compile``: the first step's dispatch (tracing + XLA compilation);
  ``input``: waiting for the next batch of the input pipeline; ``steps``: dispatching the other
  steps and waiting for their results (the device's time); ``evaluation`` and ``checkpoint``.
  """

  def __init__(self, setup: float):
    self.setup, self.compile, self.input, self.steps = setup, 0.0, 0.0, 0.0
    self.evaluation = self.checkpoint = 0.0

  def add_step(self, input_s: float, dispatch_s: float, *, first: bool) -> None:
    """One step's input wait and dispatch (the first dispatch traces and compiles); the wait for
    its result is added to ``steps`` where the metrics are fetched."""
    self.input += input_s
    if first:
      self.compile += dispatch_s
    else:
      self.steps += dispatch_s

  def parts(self) -> dict[str, float]:
    return {"setup": self.setup, "compile": self.compile, "input": self.input, "steps": self.steps,
            "evaluation": self.evaluation, "checkpoint": self.checkpoint}

  def scalars(self, total: float) -> dict[str, float]:
    out = {f"time/{k}_s": v for k, v in self.parts().items()}
    out["time/total_s"] = total
    return out


def _summary(step: int, seconds: float, workdir: str, metrics: Mapping[str, float],
             timers: Optional[_Timers] = None) -> str:
  """The end-of-run table: final metrics, where the time went and where the outputs are."""
  lines = [f"training done at step {step} in {seconds / 60:.1f} min"]
  if timers is not None and seconds > 0:
    lines.append("  time: " + ", ".join(f"{k} {v:.0f} s ({100 * v / seconds:.0f} %)"
                                        for k, v in timers.parts().items()))
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP50_agnostic")
  if metrics:
    lines.append("  " + "  ".join(f"{k:>8s}" for k in names))
    lines.append("  " + "  ".join(f"{metrics.get(f'eval/{k}', float('nan')):8.4f}" for k in names))
  lines += [f"  checkpoints  {workdir}/checkpoints", f"  metrics      {workdir}/metrics.jsonl"
            + (f", {workdir}/eval" if metrics else ""), f"  tensorboard  tensorboard --logdir {workdir}"]
  return "\n".join(lines)


def main(argv=None):
  """CLI entry point (absl flags): parses flags and calls :func:`train_and_evaluate`."""

  def define(fv, argv_):
    cli.define_config_from_file(fv, argv_)
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, config.json).", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)

  def run(f):
    shd.maybe_initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    try:
      train_and_evaluate(f.config, f.workdir)
    except NonFiniteLossError as e:
      logger.error("%s", e)
      return 3
    return 0

  return cli.run(run, "asff_jax.train", argv, define)


if __name__ == "__main__":
  sys.exit(main())
