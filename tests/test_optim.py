"""Optimizer and schedules (asff_jax.training.optim) against spec §7; the bf16 train step (traced; -m slow runs it)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asff_jax.config import default_config
from asff_jax.training import optim
from tests.conftest import trace_train_step

REPO = Path(__file__).resolve().parents[1]


def _spec_lr(step, E, base=0.001, burn=5, hold_until=20, cos_end=270, min_lr=1e-5, power=4):
  """Spec §7 written out independently (official main.py with COS on)."""
  epoch = step // E
  if epoch < burn:
    return base * (step / (burn * E)) ** power
  if epoch <= hold_until:
    return base * ((burn * E - 1) / (burn * E)) ** power  # the last burn-in iteration's value
  if epoch <= cos_end:
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (epoch - hold_until) / (cos_end - hold_until)))
  return min_lr


def test_official_schedule_matches_spec():
  E = 7
  fn = optim.official_schedule(0.001, E)
  key_steps = [0, 1, 2, 17, 5 * E - 1, 5 * E, 5 * E + 3, 20 * E, 20 * E + E - 1, 21 * E, 21 * E + 5,
               100 * E, 145 * E + 2, 269 * E + 6, 270 * E, 270 * E + 6, 271 * E, 300 * E + 6]
  for s in key_steps:
    np.testing.assert_allclose(float(fn(s)), _spec_lr(s, E), rtol=1e-5, atol=1e-12, err_msg=f"step {s}")
  # shape: 4th-power ramp, ≈ base on the plateau, piecewise constant per epoch in the cosine
  assert float(fn(0)) == 0.0
  assert abs(float(fn(10 * E)) - 0.001) < 0.001 * 4 / (5 * E)
  assert float(fn(100 * E)) == float(fn(100 * E + E - 1))
  assert float(fn(300 * E)) == pytest.approx(1e-5)
  # traced under jit gives the same values
  jitted = jax.jit(fn)
  for s in (3, 5 * E, 123 * E + 1):
    assert float(jitted(jnp.int32(s))) == pytest.approx(float(fn(s)), rel=1e-6)


def _run_config(steps_per_epoch, num_train_steps):
  """A resolved config whose run is exactly num_epochs x steps_per_epoch (no short-run scaling)."""
  c = default_config()
  c.steps_per_epoch, c.num_train_steps = steps_per_epoch, num_train_steps
  c.num_epochs = num_train_steps // steps_per_epoch
  return c


def test_schedule_boundaries_configurable_and_validated():
  c = _run_config(4, 40)
  s = c.schedule
  s.burn_in_epochs, s.constant_until_epoch, s.cosine_end_epoch, s.min_lr, s.burn_in_power = 2, 3, 9, 1e-4, 2.0
  fn = optim.make_schedule(c, base_lr=0.01)
  for step in range(40):
    want = _spec_lr(step, 4, base=0.01, burn=2, hold_until=3, cos_end=9, min_lr=1e-4, power=2)
    assert float(fn(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step
  with pytest.raises(ValueError):
    optim.official_schedule(0.01, 4, constant_until_epoch=10, cosine_end_epoch=5)
  with pytest.raises(ValueError):
    s.name = "step"
    optim.make_schedule(c, base_lr=1.0)


def test_warmup_cosine_and_constant():
  c = _run_config(5, 110)
  s = c.schedule
  s.name, s.warmup_epochs, s.min_lr = "warmup_cosine", 2.0, 0.0
  fn = optim.make_schedule(c, base_lr=0.1)
  assert float(fn(0)) == 0.0
  assert float(fn(5)) == pytest.approx(0.05)
  assert float(fn(10)) == pytest.approx(0.1)
  assert float(fn(60)) == pytest.approx(0.05, rel=1e-5)  # half-way through the cosine
  assert float(fn(110)) == pytest.approx(0.0, abs=1e-9)
  s.name = "constant"
  assert float(optim.make_schedule(c, base_lr=0.1)(77)) == pytest.approx(0.1)


def test_lr_scaling():
  o = default_config().optimizer
  assert optim.scaled_base_lr(o, 640) == 0.001  # official: not scaled
  o.lr_scaling = "linear"
  assert optim.scaled_base_lr(o, 128) == pytest.approx(0.002)
  assert optim.scaled_base_lr(o, 16) == pytest.approx(0.00025)
  o.lr_scaling = "sqrt"
  with pytest.raises(ValueError):
    optim.scaled_base_lr(o, 64)


def _config(**opt):
  c = _run_config(1, 4)
  c.batch_size = 8
  c.optimizer.update(opt)
  c.schedule.name = "constant"
  return c


def test_sgd_matches_pytorch_ordering():
  """p ← p − lr·buf, buf ← μ·buf + (g + wd·p): decay inside the momentum buffer (torch.optim.SGD)."""
  rng = np.random.default_rng(0)
  p0 = {"a": {"kernel": rng.standard_normal((3, 2)).astype(np.float32)}, "b": rng.standard_normal(4).astype(np.float32)}
  grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), p0) for _ in range(4)]
  lrs = [0.1, 0.05, 0.2, 0.01]
  mu, wd = 0.9, 0.05
  opt = optim.make_optimizer(_config(weight_decay=wd, momentum=mu), p0, )
  state = opt.tx.init(p0)
  params = jax.tree.map(jnp.asarray, p0)
  ref_p = jax.tree.map(np.copy, p0)
  ref_buf = jax.tree.map(np.zeros_like, p0)
  for g, lr in zip(grads, lrs):
    state = optim.set_learning_rate(state, lr)
    updates, state = opt.tx.update(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    d = jax.tree.map(lambda gg, pp: gg + wd * pp, g, ref_p)
    ref_buf = jax.tree.map(lambda b, dd: mu * b + dd, ref_buf, d)
    ref_p = jax.tree.map(lambda pp, b: pp - lr * b, ref_p, ref_buf)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), params, ref_p)
  assert float(optim.get_learning_rate(state)) == pytest.approx(0.01)


@pytest.fixture(scope="module")
def tiny_params():
  import importlib.util  # pylint: disable=import-outside-toplevel
  from asff_jax.models import create_model  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("tiny_cfg", REPO / "configs" / "tiny.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  model = create_model(cfg)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]


def _flat(tree):
  return {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_masks(tiny_params):
  all_ = _flat(optim.weight_decay_mask(tiny_params, "all"))
  assert all(all_.values())
  kern = _flat(optim.weight_decay_mask(tiny_params, "kernels"))
  assert all(v == k.endswith("kernel") for k, v in kern.items())
  nowd = _flat(optim.weight_decay_mask(tiny_params, "official_nowd", fusion="asff"))
  decayed = {k for k, v in nowd.items() if v}
  # official names containing "conv.weight": add_conv kernels, the head output conv, the DCN weight
  assert "backbone/layer_0/conv/kernel" in decayed
  assert "head_0/conv/kernel" in decayed
  assert any(k.startswith("head_0/feature_adaption") and "offset" not in k and k.endswith("kernel")
             for k in decayed)
  # not matched: ASFF weight_levels, guide_wh, DCN conv_offset, BN and biases
  for k in nowd:
    if any(s in k for s in ("weight_levels", "guide_wh", "conv_offset", "batch_norm")) or k.endswith("bias"):
      assert not nowd[k], k
  assert 0 < len(decayed) < sum(kern.values())
  with pytest.raises(ValueError):
    optim.weight_decay_mask(tiny_params, "some")


def test_masked_decay_leaves_excluded_params_alone():
  p = {"conv": {"kernel": jnp.ones((2, 2))}, "batch_norm": {"scale": jnp.ones(2)}}
  opt = optim.make_optimizer(_config(weight_decay_on="kernels", weight_decay=0.5), p)
  state = optim.set_learning_rate(opt.tx.init(p), 1.0)
  updates, _ = opt.tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)
  np.testing.assert_allclose(updates["batch_norm"]["scale"], 0.0)


BF16_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    import jax, jax.numpy as jnp, numpy as np
    from asff_jax.config import load_config_file, resolve_config
    from asff_jax.data import loader
    from asff_jax.models import create_model, losses
    from asff_jax.training import optim
    from asff_jax.training import sharding as shd
    from asff_jax.training.state import create_train_state
    from asff_jax.training.step import make_train_step_fn
    cfg = load_config_file(sys.argv[1])
    cfg.model.dtype = "bfloat16"
    cfg = resolve_config(cfg, **loader.dataset_info(loader.train_source(cfg)))
    model = create_model(cfg)
    mesh = shd.make_mesh()
    shape = (1, 64, 64, 3)
    pshape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
    opt = optim.make_optimizer(cfg, pshape)
    state = create_train_state(model, opt.tx, jax.random.key(0, impl="rbg"), shape, sharding=shd.replicated(mesh))
    p0 = jax.tree.map(np.asarray, state.params)
    step = make_train_step_fn(model=model, config=cfg, tx=opt.tx, lr_fn=lambda s: jnp.float32(0.01),
                              loss_fn=losses.loss_fn, mesh=mesh)
    batch = shd.make_global_batch(next(loader.make_train_iterator(cfg, 0)), mesh, cfg.batch_size)
    # the model really computes in bf16 (traced only: the dtypes, without running the forward eagerly)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), state.variables, batch["images"])
    assert out["backbone"][-1].dtype == jnp.bfloat16, out["backbone"][-1].dtype
    state, m = step(state, batch)
    dtypes = {str(x.dtype) for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state.inner_state))}
    assert dtypes == {"float32"}, dtypes
    assert m["loss"].dtype == jnp.float32 and bool(m["finite"]) and np.isfinite(float(m["loss"]))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(state.params)))
    assert moved > 0, moved
    print("BF16_OK", float(m["loss"]), moved)
""")


def test_bf16_step_dtypes_traced():
  """model.dtype='bfloat16': bf16 compute; params, BN statistics, optimizer state and loss stay float32.

  The dtype policy of the real train step, traced with ``jax.eval_shape`` (no compile); the slow
  ``test_bf16_one_step`` compiles and runs that step (finite loss, moved weights).
  """
  from asff_jax.config import load_config_file  # pylint: disable=import-outside-toplevel

  cfg = load_config_file(REPO / "configs" / "tiny.py")
  cfg.model.dtype = "bfloat16"
  state, new_state, m, model = trace_train_step(cfg)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), state.variables,
                       jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert {str(x.dtype) for x in jax.tree.leaves(out["backbone"])} == {"bfloat16"}
  dtypes = {str(x.dtype) for x in jax.tree.leaves((new_state.params, new_state.batch_stats,
                                                    new_state.opt_state.inner_state))}
  assert dtypes == {"float32"}, dtypes
  assert m["loss"].dtype == jnp.float32
  # the step's gradients reach every parameter in float32 (same tree, same shapes)
  assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)


@pytest.mark.slow  # compiles and runs the bf16 step (~60 s on 2 cores); the dtypes are checked in CI above
def test_bf16_one_step(tmp_path):
  """model.dtype='bfloat16': bf16 compute; params, optimizer state and loss stay float32."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")  # XLA flags and compilation cache: conftest
  r = subprocess.run([sys.executable, "-c", BF16_SCRIPT, str(REPO / "configs" / "tiny.py")], env=env,
                     capture_output=True, text=True, timeout=240)
  assert r.returncode == 0 and "BF16_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def _quadratic_problem(n: int):
  """``(target, loss_fn, tx, batch)``: ``loss = ||params.w − target||²`` (target of length ``n`` ≤ 3) in
  ``train_step``'s loss signature, SGD at LR 0.1, a dummy batch. Plain SGD makes ``w`` after each step
  ``w − 0.2 (w − target)``, so the tests can write the update (and the EMA) out in numpy."""
  import optax  # pylint: disable=import-outside-toplevel
  target = jnp.array([1.0, -2.0, 0.5][:n])

  def loss_fn(variables, images, labels, **_):
    loss = jnp.sum((variables["params"]["w"] - target) ** 2) + 0.0 * jnp.sum(images) + 0.0 * jnp.sum(labels)
    return loss, {"batch_stats": variables["batch_stats"], "total": loss}

  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  batch = {"images": jnp.zeros((1, 4, 4, 3)), "labels": jnp.zeros((1, 2, 5))}
  return target, loss_fn, tx, batch


def test_ema_warmup_ramp_in_the_train_step():
  """EMA of the parameters with the decay ramp d_t = decay·(1 − exp(−t/τ)), t = 1, 2, … (and τ = 0: constant).

  The real ``train_step`` on a quadratic loss, against the recurrence written out in numpy.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from asff_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  from asff_jax.training.state import init_state  # pylint: disable=import-outside-toplevel

  assert step_lib.ema_decay_at(1, 0.999, 0.0) == 0.999
  # τ from the config: as given, or (−1, the default) a tenth of the run capped at 2,000
  c = default_config()
  assert c.optimizer.ema_warmup_steps == -1 and step_lib.ema_warmup_for(c) == 2000.0  # run length unresolved
  for steps, tau in ((6500, 650.0), (100_000, 2000.0), (20, 2.0)):
    c.num_train_steps = steps
    assert step_lib.ema_warmup_for(c) == tau
    assert float(step_lib.ema_decay_at(steps, 0.999, tau)) >= 0.999 * (1 - 1e-4)  # decay reached by the end
  c.optimizer.ema_warmup_steps = 0
  assert step_lib.ema_warmup_for(c) == 0.0
  np.testing.assert_allclose(step_lib.ema_decay_at(1, 0.999, 2000.0), 0.999 * -math.expm1(-1 / 2000), rtol=1e-5)
  np.testing.assert_allclose(step_lib.ema_decay_at(20000, 0.999, 2000.0), 0.999 * (1 - math.exp(-10)), rtol=1e-6)

  target, loss_fn, tx, batch = _quadratic_problem(3)
  config = ml_collections.ConfigDict({"seed": 0})
  for decay, tau in ((0.9, 2.0), (0.9, 0.0)):
    state = init_state({"params": {"w": jnp.zeros(3)}, "batch_stats": {}}, tx, use_ema=True)
    fn = jax.jit(lambda s, b, decay=decay, tau=tau: step_lib.train_step(
        s, b, model=None, config=config, tx=tx, lr_fn=lambda t: 0.1, loss_fn=loss_fn,
        ema_decay=decay, ema_warmup_steps=tau))
    w, ema = np.zeros(3), np.zeros(3)
    for t in range(1, 6):
      state, _ = fn(state, batch)
      w = w - 0.1 * 2 * (w - np.asarray(target))
      d = decay * (1 - math.exp(-t / tau)) if tau else decay
      ema = d * ema + (1 - d) * w
      np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-6)
      np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-5, atol=1e-7)
    assert int(state.step) == 5


def test_ema_decay_cut_for_a_short_run_is_what_the_train_step_uses():
  """A run shorter than 3 / (1 − ema_decay) steps averages over a third of itself: d = 1 − 3 / steps,
  announced by ``schedule_fit_messages``; the training loop's step function uses that decay."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from asff_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from asff_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  from asff_jax.training.state import init_state  # pylint: disable=import-outside-toplevel

  c = default_config()
  c.optimizer.ema_decay = 0.999
  for steps, want in ((3000, 0.999), (100_000, 0.999), (800, 1 - 3 / 800), (20, 0.85), (2, 0.0)):
    c.num_train_steps = steps
    assert config_lib.ema_decay(c) == pytest.approx(want, abs=1e-12)
    cut = [m for m in config_lib.schedule_fit_messages(c) if "EMA decay" in m]
    assert bool(cut) == (want < 0.999), (steps, cut)
  c.num_train_steps = 800
  (msg,) = [m for m in config_lib.schedule_fit_messages(c) if "EMA decay" in m]
  assert "0.999" in msg and "~1000 steps" in msg and "0.99625" in msg and "~267 steps" in msg
  c.optimizer.ema_decay = 0.0
  assert config_lib.ema_decay(c) == 0.0 and not any("EMA" in m for m in config_lib.schedule_fit_messages(c))

  # the loop's step function (make_train_step_fn) on a quadratic loss: EMA with the cut decay, τ = 0
  config = ml_collections.ConfigDict({"seed": 0, "num_train_steps": 12,
                                      "optimizer": {"ema_decay": 0.9, "ema_warmup_steps": 0}})
  d = config_lib.ema_decay(config)
  assert d == pytest.approx(0.75)
  target, loss_fn, tx, batch = _quadratic_problem(2)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  fn = step_lib.make_train_step_fn(model=None, config=config, tx=tx, lr_fn=lambda t: 0.1, loss_fn=loss_fn,
                                   mesh=mesh)
  state = init_state({"params": {"w": jnp.zeros(2)}, "batch_stats": {}}, tx, use_ema=True)
  w, ema = np.zeros(2), np.zeros(2)
  for _ in range(3):
    state, _ = fn(state, batch)
    w = w - 0.1 * 2 * (w - np.asarray(target))
    ema = d * ema + (1 - d) * w
  np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-5, atol=1e-7)
