"""Lab (issue 5, one-off, not tested): how fast the reduced backbone learns the digit class from crops.

    python experiments/lab/crop_readout.py MODE [STEPS]

MODE: ``softmax`` (scale-normalised centred crops, digit 40-90 % of a 96 px crop; softmax CE),
``bce`` (same crops, the detector's label-smoothed sigmoid BCE), ``softmax_detscale`` (centred 96 px
windows of the 256 px detection input: digits at detection scale); ``..._clip`` adds clipping at 10.
Backbone -> centre cells of C3-C5 -> dense; AdamW 2e-3 cosine, batch 64. Prints the training accuracy
of the last 20 steps. Results: experiments/default_config.md, fifth calibration session.
"""
import os, sys, time, jax, jax.numpy as jnp, numpy as np, optax
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from asff_jax import pretrain
from asff_jax.train import load_config_file
from asff_jax.data import loader
from asff_jax.data.transforms import normalize_jax
mode = sys.argv[1]; steps = int(sys.argv[2]) if len(sys.argv) > 2 else 160
cfg = load_config_file(REPO + "/configs/default.py")
src = loader.train_source(cfg)
if "detscale" in mode:
  import io
  from PIL import Image
  rng0 = np.random.default_rng(0); crops, classes = [], []
  for k in range(1500):
    r = src[k]
    with Image.open(io.BytesIO(r["image"])) as im:
      img = im.convert("RGB"); W, H = img.size
      for b, c in zip(r["boxes"], r["classes"]):
        x1, y1, x2, y2 = (float(v) for v in b)
        side = max(x2 - x1, y2 - y1)
        cx = 0.5 * (x1 + x2) + rng0.uniform(-0.15, 0.15) * side
        cy = 0.5 * (y1 + y2) + rng0.uniform(-0.15, 0.15) * side
        hw, hh = 48 * W / 256, 48 * H / 256
        crops.append(np.asarray(img.transform((96, 96), Image.EXTENT, (cx - hw, cy - hh, cx + hw, cy + hh), Image.BILINEAR, fillcolor=(124, 116, 104)), np.uint8)); classes.append(int(c))
  crops, classes = np.stack(crops), np.asarray(classes, np.int32)
  print(len(crops))
else:
  crops, classes = pretrain.extract_crops(src, crop_size=96, num_images=1500, context_min=1.1, context_max=2.5, seed=0, log=print)
mc = cfg.model
model = pretrain.CropClassifier(float(mc.width), tuple(mc.stage_blocks), 10, pool="center")
v = model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)), train=False)
tx = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=5e-4)
if "clip" in mode: tx = optax.chain(optax.clip_by_global_norm(10.0), tx)
params, stats = v["params"], v["batch_stats"]; opt = tx.init(params)
@jax.jit
def step(params, stats, opt, x, y):
  def lf(p):
    logits, upd = model.apply({"params": p, "batch_stats": stats}, normalize_jax(x), train=True, mutable=["batch_stats"])
    if mode.startswith("softmax"):
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    else:
      t = jnp.where(jax.nn.one_hot(y, 10) > 0, 0.9, 0.1)
      loss = optax.sigmoid_binary_cross_entropy(logits, t).sum(-1).mean()
    return loss, (upd["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))
  (loss, (ns, acc)), g = jax.value_and_grad(lf, has_aux=True)(params)
  u, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, u), ns, opt, acc
rng = np.random.default_rng(0); accs = []; t0 = time.time()
for i in range(steps):
  idx = rng.choice(len(crops), 64)
  params, stats, opt, acc = step(params, stats, opt, crops[idx], classes[idx]); accs.append(acc)
  if (i + 1) % 20 == 0: print(mode, i + 1, round(float(np.mean(jax.device_get(accs[-20:]))), 3), round(time.time() - t0), flush=True)
