"""Lab (issue 5, one-off, not tested): the reduced backbone learning the digit class from whole images.

    python experiments/lab/whole_image_readout.py MODE [STEPS] [BATCH] [MIN_SIZE]

Batches of the default config's training pipeline (256 px, its augmentation); the class is read at
the GT centre cell of a size-chosen level (MODE ``single``) or of all three levels summed (MODE with
``multi``); ``noaug`` turns the geometric augmentation off, ``gn`` swaps BatchNorm for GroupNorm(8).
Softmax CE, AdamW 2e-3 cosine. Prints the training accuracy over the last 25 steps: all digits, < 16 px,
16-40 px, >= 40 px. Results: experiments/default_config.md, fifth calibration session.
"""
import os, sys, time, jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from asff_jax.train import load_config_file
from asff_jax.data import loader
from asff_jax.models.darknet import Darknet53
mode = sys.argv[1]; MINSZ = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0; steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
cfg = load_config_file(REPO + "/configs/default.py")
cfg.batch_size = int(sys.argv[3]) if len(sys.argv) > 3 else 16
if "noaug" in mode:
  cfg.dataset.augment.affine_p = 0.0; cfg.dataset.augment.expand_p = 0.0; cfg.dataset.augment.crop_p = 0.0
it = loader.make_train_iterator(cfg, 0)
mc = cfg.model
if "gn" in mode:
  from asff_jax.models import layers as L
  class GN(nn.Module):
    dtype: object = jnp.float32
    @nn.compact
    def __call__(self, x, train):
      c = x.shape[-1]
      scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
      self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
      g = min(8, c)
      xg = x.reshape(x.shape[:3] + (g, c // g))
      mean = xg.mean((1, 2, 4), keepdims=True); var = xg.var((1, 2, 4), keepdims=True)
      return ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape) * scale + bias
  L.BatchNorm = GN
class M(nn.Module):
  @nn.compact
  def __call__(self, x, lab, train):
    feats = Darknet53(float(mc.width), tuple(mc.stage_blocks), jnp.float32, name="backbone")(x, train)  # C3, C4, C5
    s = x.shape[1]
    cx, cy, w, h = lab[..., 1], lab[..., 2], lab[..., 3], lab[..., 4]
    size = jnp.maximum(w, h)
    lv = jnp.where(size < 24, 0, jnp.where(size < 56, 1, 2))  # index into (C3, C4, C5)
    logits = 0.0
    for k, (f, st) in enumerate(zip(feats, (8, 16, 32))):
      g = f.shape[1]
      j = jnp.clip((cy // st).astype(jnp.int32), 0, g - 1); i = jnp.clip((cx // st).astype(jnp.int32), 0, g - 1)
      b = jnp.arange(f.shape[0])[:, None]
      cell = f[b, j, i]  # (B, N, C)
      if "multi" in mode:  # all three levels at the centre, concatenated (as the crop classifier)
        logits = logits + nn.Dense(10, name=f"cls{k}")(cell)
      else:
        logits = logits + jnp.where((lv == k)[..., None], nn.Dense(10, name=f"cls{k}")(cell), 0.0)
    return logits
m = M()
b0 = next(it)
v = m.init(jax.random.key(0), b0["images"][:1], b0["labels"][:1], False)
tx = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=5e-4)
params, stats = v["params"], v["batch_stats"]; opt = tx.init(params)
@jax.jit
def step(params, stats, opt, x, lab):
  valid = lab[..., 3] > 0; y = lab[..., 0].astype(jnp.int32)
  def lf(p):
    logits, upd = m.apply({"params": p, "batch_stats": stats}, x, lab, True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    n = jnp.maximum(valid.sum(), 1)
    size = jnp.maximum(lab[..., 3], lab[..., 4]); hit = (jnp.argmax(logits, -1) == y)
    accs = [jnp.sum(hit & valid & m_) / jnp.maximum(jnp.sum(valid & m_), 1) for m_ in (size > 0, size < 16, (size >= 16) & (size < 40), size >= 40)]
    train_m = valid & (size >= MINSZ)
    return jnp.sum(ce * train_m) / jnp.maximum(train_m.sum(), 1), (upd["batch_stats"], jnp.stack(accs))
  (loss, (ns, acc)), g = jax.value_and_grad(lf, has_aux=True)(params)
  u, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, u), ns, opt, acc
accs = []; t0 = time.time()
for i in range(steps):
  b = next(it) if i else b0
  params, stats, opt, acc = step(params, stats, opt, jnp.asarray(b["images"]), jnp.asarray(b["labels"])); accs.append(acc)
  if (i + 1) % 25 == 0: print(mode, i + 1, np.round(np.mean(np.stack(jax.device_get(accs[-25:])), 0), 3), round(time.time() - t0), flush=True)
