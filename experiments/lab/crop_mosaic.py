"""Lab (issue 5, one-off, not tested): the detector trained with crop mosaics mixed into its batches.

    python experiments/lab/crop_mosaic.py WORKDIR STEPS P_MOSAIC [GRIDS] [config.key=value ...]

configs/default.py (``dcn_formulation='patches'``) where each image is, with probability P_MOSAIC,
replaced by a GxG mosaic (G from GRIDS, default 2,4,8) of centred digit crops (digit 50-77 % of its
tile) with exact boxes; set ``dataset.max_boxes=64`` for the 8x8 grid. Evaluates on the val split at
the end. Results: experiments/default_config.md, fifth calibration session.
"""
import io, os, sys, time
import numpy as np
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from PIL import Image
from absl import logging
from asff_jax import train
from asff_jax.data import loader
from asff_jax.data.transforms import normalize_jax

workdir, steps, p_mosaic = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
grids = tuple(int(g) for g in sys.argv[4].split(",")) if len(sys.argv) > 4 else (2, 4, 8)
extra = sys.argv[5:]
cfg = train.load_config_file(REPO + "/configs/default.py")
cfg.num_train_steps = steps; cfg.eval_every_steps = 100000; cfg.checkpoint_every_steps = 100000
cfg.log_every_steps = 25; cfg.model.dcn_formulation = "patches"
for kv in extra:
  k, v = kv.split("="); node = cfg
  *path, last = k.split(".")
  for p in path: node = node[p]
  node[last] = type(node[last])(v) if not isinstance(node[last], bool) else v == "True"
S = int(cfg.dataset.input_size); MB = int(cfg.dataset.max_boxes)

T = 128  # crop side; digit fills 1/1.3 .. 1/2.0 of it
src = loader.train_source(cfg)
rng0 = np.random.default_rng(0); crops, boxes, classes = [], [], []
t0 = time.time()
for k in range(len(src)):
  r = src[k]
  with Image.open(io.BytesIO(r["image"])) as im:
    img = im.convert("RGB")
    for b, c in zip(r["boxes"], r["classes"]):
      x1, y1, x2, y2 = (float(v) for v in b)
      side = max(x2 - x1, y2 - y1)
      if side < 6: continue
      s = side * rng0.uniform(1.3, 2.0)
      cx = 0.5 * (x1 + x2) + rng0.uniform(-0.1, 0.1) * side; cy = 0.5 * (y1 + y2) + rng0.uniform(-0.1, 0.1) * side
      ox, oy = cx - s / 2, cy - s / 2
      crops.append(np.asarray(img.transform((T, T), Image.EXTENT, (ox, oy, ox + s, oy + s), Image.BILINEAR, fillcolor=(124, 116, 104)), np.uint8))
      f = T / s
      boxes.append([(x1 - ox) * f, (y1 - oy) * f, (x2 - ox) * f, (y2 - oy) * f]); classes.append(int(c))
crops = np.stack(crops); boxes = np.clip(np.asarray(boxes, np.float32), 0, T); classes = np.asarray(classes)
pyr = {T: crops}
for t in (64, 32):
  f = T // t
  pyr[t] = crops.reshape(len(crops), t, f, t, f, 3).mean((2, 4)).astype(np.float32)
print(f"{len(crops)} crops in {time.time() - t0:.0f} s", flush=True)

def mosaic(rng):
  g = int(rng.choice(grids)); t = S // g
  idx = rng.choice(len(crops), g * g)
  tiles = pyr[t][idx].astype(np.float32)
  img = tiles.reshape(g, g, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(S, S, 3)
  f = t / T
  bx = boxes[idx] * f
  oy, ox = np.divmod(np.arange(g * g), g)
  bx = bx + np.stack([ox * t, oy * t, ox * t, oy * t], -1)
  wh = bx[:, 2:] - bx[:, :2]
  keep = np.min(wh, -1) > 6
  rows = np.concatenate([classes[idx][:, None], bx[:, :2] + wh / 2, wh, np.ones((len(idx), 1))], -1)[keep][:MB]
  lab = np.zeros((MB, 6), np.float32); lab[:len(rows)] = rows
  return np.asarray(normalize_jax(img)), lab

def it_fn(config, start):
  base = train.make_train_iterator(config, start)
  rng = np.random.default_rng(123 + start)
  for batch in base:
    im, lab = np.array(batch["images"]), np.array(batch["labels"])
    for b in range(len(im)):
      if rng.uniform() < p_mosaic:
        im[b], lab[b] = mosaic(rng)
    yield {"images": im, "labels": lab}

logging.set_verbosity(logging.INFO)
ev = loader.make_evaluate_fn(cfg, workdir)
train.train_and_evaluate(cfg, workdir, evaluate_fn=ev, train_iter_fn=it_fn)
