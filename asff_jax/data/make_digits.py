"""The built-in real-image detection dataset ``digits`` (COCO format, fully offline).

What
----
Real handwritten digits pasted onto real photographs. The digits are the 1,797
8x8 samples of scikit-learn's handwritten-digits set
(:func:`sklearn.datasets.load_digits`, intensities 0-16); the backgrounds are
photographs that scikit-image ships inside its wheel and loads without any
download (``skimage.data``):

  astronaut, brick, camera, chelsea, clock, coffee, coins, grass, gravel,
  hubble_deep_field, immunohistochemistry, moon, retina, rocket,
  stereo_motorcycle (left view)

Gray-scale ones (brick, camera, clock, coins, grass, gravel, moon) are
converted to RGB.

Why
---
A detector needs a small, quick, *real-pixel* dataset for end-to-end training
and evaluation (smoke runs, CI, tutorials) that exists on every machine
without network access. Objects range from tiny to large so that all three
YOLOv3/ASFF output levels receive targets, several sizes share one image, and
the COCO layout lets the same loader / ``pycocotools`` evaluation used for
COCO 2017 run unchanged.

How an image is made
--------------------
* size: width and height drawn independently and uniformly in 240..480 px
  (so most images are not square);
* background: a random photograph, randomly rescaled (0.6x..1.6x, limited so
  the crop fits), randomly cropped to the image size and flipped horizontally
  with probability 1/2;
* 1..12 digits (uniform). Each digit sample's 8x8 intensity map (/16, padded
  by one zero pixel) is upsampled with PIL bicubic interpolation to a side
  ``S`` drawn log-uniformly in ``[10, 0.45 * min(width, height)]`` px (width
  additionally scaled by a log-uniform aspect factor in 0.8..1.25), then a
  contrast ramp turns it into an ink-like alpha mask in [0, 1];
* placement: uniform position with the whole patch inside the image; a
  placement is rejected (and retried, up to 30 times, after which the digit is
  dropped — the first digit always fits) if its box has IoU > 0.3 with an
  earlier digit's box or covers more than 50% of it, or vice versa;
* colour: a random RGB colour whose luma differs by at least 80 (of 255) from
  the mean luma of the background under the stroke (falling back to black or
  white), alpha-blended onto the background;
* boxes are the tight bounding boxes of the *blended* alpha
  (``alpha > ALPHA_THRESHOLD``), so the empty margins of the 8x8 source never
  inflate them. Sizes cover COCO's small (< 32^2), medium and large (> 96^2)
  ranges: about 49% of the objects are small, 41% medium and 10% large
  (6.5 digits per image on average).

Splits
------
A seeded permutation of the 1,797 samples gives 1,437 (80%) for ``train`` and
360 for ``val``: no handwritten sample appears in both splits. Each annotation
records its source sample in the extra field ``digit_index`` (ignored by
``pycocotools``). Defaults: 3,000 train and 500 val images.

Layout (exactly as COCO ships)
------------------------------
::

  DIR/annotations/instances_train.json
  DIR/annotations/instances_val.json
  DIR/train/000000000001.jpg ...        (JPEG quality 92)
  DIR/val/000000000001.jpg ...
  DIR/DONE                               (marker, written last; JSON parameters)

The json files hold ``info``, ``licenses``, ``images`` (id, file_name, width,
height), ``annotations`` (id, image_id, category_id, bbox ``[x, y, w, h]`` in
pixels with integer corners, area = w*h, iscrowd 0, segmentation = the box
polygon, digit_index) and ``categories`` (ids 1..10 named "0".."9",
supercategory "digit"; id = digit + 1). Image and annotation ids start at 1.

Determinism
-----------
Every image draws from its own generator
``np.random.default_rng([seed, split_index, image_index])`` (split_index 0 for
train, 1 for val), so the output is byte-identical for a given seed whatever
the number of worker processes, and image ``i`` does not depend on how many
images are requested. The folder is built in a temporary sibling directory
and renamed into place only once complete (marker included), so a
half-written dataset is never mistaken for a finished one.

Cost: the full default (3,500 images, ~22,800 digits) takes about 12-15 s on
2 cores (``spawn`` workers when JAX / TF is already imported, ``fork``
otherwise; both give identical bytes) and ~125 MB on disk.

Command line::

  python -m asff_jax.data.make_digits --out DIR [--seed S] [--num-train N] [--num-val M] [--workers W]
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "ALPHA_THRESHOLD", "BACKGROUNDS", "CATEGORIES", "MARKER", "SPLITS",
    "digit_split_indices", "ensure_digits", "is_complete", "make_digits", "render_image",
]

VERSION = 1
MARKER = "DONE"
SPLITS = ("train", "val")
# skimage.data loaders that work without network (part of the wheel).
BACKGROUNDS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "stereo_motorcycle",
)
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]

NUM_DIGIT_SAMPLES = 1797
TRAIN_FRACTION = 0.8
IMAGE_SIDE = (240, 480)          # inclusive range of width and height
DIGITS_PER_IMAGE = (1, 12)       # inclusive
MIN_DIGIT = 10.0                 # px, side of the 8x8 content
MAX_DIGIT_FRAC = 0.45            # of min(width, height)
ASPECT = (0.8, 1.25)             # digit width / height factor range (log-uniform)
BG_SCALE = (0.6, 1.6)            # background rescale range
MAX_IOU = 0.3
MAX_COVER = 0.5
PLACE_TRIES = 30
MIN_LUMA_DIFF = 80.0
ALPHA_LO, ALPHA_HI = 0.15, 0.45  # contrast ramp applied to the interpolated intensity
ALPHA_THRESHOLD = 0.05           # a pixel belongs to the visible digit iff alpha > this
JPEG_QUALITY = 92

# Per-process caches (filled lazily; each spawned worker loads its own copy).
_DIGITS: tuple[np.ndarray, np.ndarray] | None = None
_BACKGROUNDS: dict[int, np.ndarray] = {}


# ---------------------------------------------------------------------------
# Source material
# ---------------------------------------------------------------------------

def _digits() -> tuple[np.ndarray, np.ndarray]:
  """``(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int)`` from scikit-learn."""
  global _DIGITS
  if _DIGITS is None:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel  (generation only)
    d = load_digits()
    images = (np.asarray(d.images, np.float32) / 16.0).clip(0.0, 1.0)
    labels = np.asarray(d.target, np.int64)
    if images.shape != (NUM_DIGIT_SAMPLES, 8, 8):
      raise RuntimeError(f"unexpected sklearn digits shape {images.shape}")
    _DIGITS = (images, labels)
  return _DIGITS


def _background_photo(i: int) -> np.ndarray:
  """Background photograph ``BACKGROUNDS[i]`` as an RGB uint8 array (loaded once per process).

  Raises:
    RuntimeError: if it cannot be loaded offline.
  """
  photo = _BACKGROUNDS.get(i)
  if photo is None:
    import skimage.data  # pylint: disable=import-outside-toplevel  (generation only)
    name = BACKGROUNDS[i]
    try:
      img = getattr(skimage.data, name)()
    except Exception as e:  # pragma: no cover - depends on the installed skimage
      raise RuntimeError(f"skimage.data.{name}() could not be loaded offline: {e!r}") from e
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
      img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
      raise RuntimeError(f"skimage.data.{name}() has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
      img = np.repeat(img[:, :, None], 3, axis=2)
    photo = _BACKGROUNDS[i] = np.ascontiguousarray(img[:, :, :3])
  return photo


def digit_split_indices(seed: int = 0) -> dict[str, np.ndarray]:
  """Disjoint sets of sklearn digit sample indices used by each split.

  Args:
    seed: dataset seed.

  Returns:
    ``{"train": sorted int array (1437,), "val": sorted int array (360,)}``
    partitioning ``range(1797)`` by a seeded permutation.
  """
  perm = np.random.default_rng([seed, 1_797]).permutation(NUM_DIGIT_SAMPLES)
  n_train = int(round(TRAIN_FRACTION * NUM_DIGIT_SAMPLES))
  return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:])}


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """A random rescaled / cropped / flipped photograph crop, ``(height, width, 3)`` uint8."""
  src = _background_photo(int(rng.integers(len(BACKGROUNDS))))
  sh, sw = src.shape[:2]
  min_scale = max(width / sw, height / sh)  # the crop (before resizing) must fit in the source
  lo = max(BG_SCALE[0], min_scale)
  hi = max(BG_SCALE[1], lo)
  scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
  cw = min(sw, max(1, int(math.ceil(width / scale))))
  ch = min(sh, max(1, int(math.ceil(height / scale))))
  x0 = int(rng.integers(sw - cw + 1))
  y0 = int(rng.integers(sh - ch + 1))
  flip = bool(rng.integers(2))
  crop = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw])
  crop = crop.resize((width, height), Image.BILINEAR)
  if flip:
    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
  return np.array(crop, dtype=np.uint8)


def _digit_alpha(sample: np.ndarray, width: int, height: int) -> np.ndarray:
  """Alpha mask ``(ph, pw)`` float32 in [0, 1] of one 8x8 sample whose 8x8 content is ``width x height`` px.

  The map is zero-padded by one pixel (so strokes fade out instead of being
  cut at the patch border), upsampled bicubically, and passed through a
  linear contrast ramp (``ALPHA_LO`` -> 0, ``ALPHA_HI`` -> 1) for ink-like
  strokes with soft anti-aliased edges.
  """
  padded = np.pad(sample, 1).astype(np.float32)
  pw = max(3, int(round(width * 10 / 8)))
  ph = max(3, int(round(height * 10 / 8)))
  up = np.asarray(Image.fromarray(padded, mode="F").resize((pw, ph), Image.BICUBIC), np.float32)
  return ((up - ALPHA_LO) / (ALPHA_HI - ALPHA_LO)).clip(0.0, 1.0)


def _tight_box(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
  """``(x0, y0, x1, y1)`` (exclusive end) of ``alpha > ALPHA_THRESHOLD``, or None if empty."""
  mask = alpha > ALPHA_THRESHOLD
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    return None
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _overlaps(box, others) -> bool:
  """True if ``box`` (xyxy) conflicts with any of ``others`` (IoU or coverage too large)."""
  if not others:
    return False
  o = np.asarray(others, np.float64)
  b = np.asarray(box, np.float64)
  iw = np.clip(np.minimum(o[:, 2], b[2]) - np.maximum(o[:, 0], b[0]), 0, None)
  ih = np.clip(np.minimum(o[:, 3], b[3]) - np.maximum(o[:, 1], b[1]), 0, None)
  inter = iw * ih
  area_o = (o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1])
  area_b = (b[2] - b[0]) * (b[3] - b[1])
  iou = inter / (area_o + area_b - inter)
  cover = np.maximum(inter / area_o, inter / area_b)
  return bool(np.any(iou > MAX_IOU) or np.any(cover > MAX_COVER))


def _luma(rgb) -> np.ndarray:
  rgb = np.asarray(rgb, np.float32)
  return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _colour(rng: np.random.Generator, bg_luma: float) -> np.ndarray:
  """A random RGB colour whose luma differs from ``bg_luma`` by at least ``MIN_LUMA_DIFF``."""
  for _ in range(10):
    c = rng.integers(0, 256, size=3)
    if abs(float(_luma(c)) - bg_luma) >= MIN_LUMA_DIFF:
      return c.astype(np.float32)
  return np.full(3, 0.0 if bg_luma > 127.5 else 255.0, np.float32)


def render_image(seed: int, split: str, index: int) -> dict:
  """Render image ``index`` (0-based) of ``split`` exactly as :func:`make_digits` writes it.

  Args:
    seed: dataset seed.
    split: ``"train"`` or ``"val"``.
    index: 0-based image index within the split (file / image id is ``index + 1``).

  Returns:
    dict with ``image`` (``(height, width, 3)`` uint8, before JPEG encoding),
    ``width``, ``height`` and ``objects``: a list (drawing order) of dicts with
    ``bbox`` (COCO ``[x, y, w, h]`` ints), ``category_id`` (digit + 1),
    ``digit_index`` (sklearn sample index), ``alpha`` (the blended mask patch,
    float32) and ``offset`` (``(x, y)`` of the patch's top-left corner).

  Raises:
    ValueError: for an unknown split or a negative index.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  images, labels = _digits()
  pool = digit_split_indices(seed)[split]
  rng = np.random.default_rng([seed, SPLITS.index(split), index])

  width = int(rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1))
  height = int(rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1))
  canvas = _background(rng, width, height)
  n_digits = int(rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1))
  max_side = MAX_DIGIT_FRAC * min(width, height)

  objects, boxes = [], []
  for _ in range(n_digits):
    sample_idx = int(pool[int(rng.integers(len(pool)))])
    side = float(np.exp(rng.uniform(np.log(MIN_DIGIT), np.log(max_side))))
    aspect = float(np.exp(rng.uniform(np.log(ASPECT[0]), np.log(ASPECT[1]))))
    alpha = _digit_alpha(images[sample_idx], side * aspect, side)
    ph, pw = alpha.shape
    if pw > width or ph > height:  # cannot happen with the ranges above; guard anyway
      continue
    tight = _tight_box(alpha)
    if tight is None:
      continue
    placed = None
    for _ in range(PLACE_TRIES):
      ox = int(rng.integers(width - pw + 1))
      oy = int(rng.integers(height - ph + 1))
      box = (ox + tight[0], oy + tight[1], ox + tight[2], oy + tight[3])
      if not _overlaps(box, boxes):
        placed = (ox, oy, box)
        break
    if placed is None:
      continue
    ox, oy, box = placed
    region = canvas[oy:oy + ph, ox:ox + pw].astype(np.float32)
    a = alpha[:, :, None]
    stroke = alpha > 0.5
    bg_luma = float(_luma(region[stroke]).mean()) if stroke.any() else float(_luma(region).mean())
    colour = _colour(rng, bg_luma)
    blended = region * (1.0 - a) + colour * a
    canvas[oy:oy + ph, ox:ox + pw] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    boxes.append(box)
    objects.append({
        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
        "category_id": int(labels[sample_idx]) + 1,
        "digit_index": sample_idx,
        "alpha": alpha,
        "offset": (ox, oy),
    })
  return {"image": canvas, "width": width, "height": height, "objects": objects}


def _file_name(index: int) -> str:
  return f"{index + 1:012d}.jpg"


def _render_chunk(args) -> list[tuple[int, int, int, list[dict]]]:
  """Worker: render and write images; returns ``(index, width, height, objects-without-alpha)``."""
  seed, split, indices, image_dir = args
  out = []
  for index in indices:
    r = render_image(seed, split, index)
    buf = io.BytesIO()
    Image.fromarray(r["image"]).save(buf, format="JPEG", quality=JPEG_QUALITY)
    with open(os.path.join(image_dir, _file_name(index)), "wb") as f:
      f.write(buf.getvalue())
    objs = [{k: o[k] for k in ("bbox", "category_id", "digit_index")} for o in r["objects"]]
    out.append((index, r["width"], r["height"], objs))
  return out


def _coco_json(split: str, seed: int, rows) -> dict:
  images, annotations = [], []
  ann_id = 1
  for index, width, height, objs in sorted(rows, key=lambda r: r[0]):
    image_id = index + 1
    images.append({"id": image_id, "file_name": _file_name(index), "width": width, "height": height})
    for o in objs:
      x, y, w, h = o["bbox"]
      annotations.append({
          "id": ann_id, "image_id": image_id, "category_id": o["category_id"],
          "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
          "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
          "digit_index": o["digit_index"],
      })
      ann_id += 1
  return {
      "info": {
          "description": f"asff_jax built-in 'digits' dataset ({split}): sklearn handwritten digits "
                         "on skimage.data photographs",
          "version": str(VERSION), "year": 2024, "contributor": "asff_jax", "date_created": "",
          "seed": seed, "backgrounds": list(BACKGROUNDS),
      },
      "licenses": [],
      "images": images,
      "annotations": annotations,
      "categories": [dict(c) for c in CATEGORIES],
  }


def _params(seed: int, num_train: int, num_val: int) -> dict:
  return {"dataset": "digits", "version": VERSION, "seed": int(seed),
          "num_train": int(num_train), "num_val": int(num_val)}


def _pool_context():
  """``fork`` is fastest, but unsafe once multithreaded runtimes (JAX, TF) are loaded."""
  if sys.platform.startswith("linux") and not any(m in sys.modules for m in ("jax", "tensorflow", "torch")):
    return mp.get_context("fork")
  return mp.get_context("spawn")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def make_digits(out_dir, seed: int = 0, num_train: int = 3000, num_val: int = 500,
                workers: int | None = None, progress: bool = True) -> Path:
  """Generate the ``digits`` dataset at ``out_dir`` (replacing anything there).

  The folder is built in a temporary sibling directory and renamed into place
  at the end; the ``DONE`` marker (JSON of the generation parameters) is the
  last file written.

  Args:
    out_dir: destination dataset root.
    seed: dataset seed; the output is byte-identical for equal seeds and counts.
    num_train: number of ``train`` images (>= 0).
    num_val: number of ``val`` images (>= 0).
    workers: processes to render with; ``None`` = all CPUs for large requests
      (>= 200 images), in-process otherwise. ``1`` renders in-process.
    progress: print a one-line progress report every few seconds and at the end.

  Returns:
    ``Path`` of the dataset root (``out_dir``).

  Raises:
    ValueError: for negative counts or ``workers < 1``.
    RuntimeError: if a background photograph cannot be loaded offline.
  """
  if num_train < 0 or num_val < 0:
    raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
  total = num_train + num_val
  if workers is None:
    workers = (os.cpu_count() or 1) if total >= 200 else 1
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  out_dir = Path(out_dir).expanduser().absolute()
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{time.time_ns()}"
  t0 = time.time()
  try:
    (tmp / "annotations").mkdir(parents=True)
    counts = {"train": num_train, "val": num_val}
    jobs = []
    for split in SPLITS:
      image_dir = tmp / split
      image_dir.mkdir()
      n = counts[split]
      step = max(1, min(32, -(-n // (4 * workers))))
      jobs += [(seed, split, list(range(s, min(n, s + step))), str(image_dir)) for s in range(0, n, step)]
    rows = {split: [] for split in SPLITS}
    done, last = 0, time.time()

    def consume(job, result):
      nonlocal done, last
      rows[job[1]].extend(result)
      done += len(result)
      if progress and (time.time() - last > 5.0):
        last = time.time()
        el = last - t0
        print(f"[digits] {done}/{total} images, {el:.1f}s elapsed, ~{el / done * (total - done):.0f}s left",
              flush=True)

    if workers == 1 or len(jobs) <= 1:
      for job in jobs:
        consume(job, _render_chunk(job))
    else:
      with _pool_context().Pool(workers) as pool:
        for job, result in zip(jobs, pool.imap(_render_chunk, jobs)):
          consume(job, result)

    for split in SPLITS:
      data = _coco_json(split, seed, rows[split])
      with open(tmp / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(data, f, separators=(",", ":"))
    with open(tmp / MARKER, "w") as f:
      json.dump(_params(seed, num_train, num_val), f)

    trash = None
    if out_dir.exists() or out_dir.is_symlink():
      trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
      os.rename(out_dir, trash)
    os.rename(tmp, out_dir)
    if trash is not None:
      shutil.rmtree(trash, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if progress:
    n_ann = sum(len(r[3]) for split in SPLITS for r in rows[split])
    print(f"[digits] wrote {total} images ({n_ann} digits) to {out_dir} in {time.time() - t0:.1f}s "
          f"with {workers} worker(s)", flush=True)
  return out_dir


def is_complete(root, seed: int | None = None, num_train: int | None = None,
                num_val: int | None = None) -> bool:
  """Whether ``root`` holds a finished ``digits`` dataset (optionally with these parameters).

  Args:
    root: dataset root.
    seed, num_train, num_val: if given, must match the values in the marker.

  Returns:
    True iff the ``DONE`` marker, both annotation files and both image folders
    exist and the marker's parameters match those given.
  """
  root = Path(root)
  marker = root / MARKER
  if not marker.is_file():
    return False
  try:
    params = json.loads(marker.read_text())
  except (OSError, ValueError):
    return False
  if params.get("dataset") != "digits" or params.get("version") != VERSION:
    return False
  for key, want in (("seed", seed), ("num_train", num_train), ("num_val", num_val)):
    if want is not None and params.get(key) != want:
      return False
  return all((root / "annotations" / f"instances_{s}.json").is_file() and (root / s).is_dir()
             for s in SPLITS)


def ensure_digits(cache_dir, seed: int = 0, num_train: int = 3000, num_val: int = 500,
                  workers: int | None = None, progress: bool = True) -> Path:
  """Return the ``digits`` dataset root ``cache_dir``, generating it first if needed.

  The dataset is (re)generated when the ``DONE`` marker is missing (absent or
  half-written folder) or records different parameters.

  Args:
    cache_dir: dataset root (created if missing).
    seed, num_train, num_val, workers, progress: as in :func:`make_digits`.

  Returns:
    ``Path`` of the dataset root.

  Raises:
    ValueError, RuntimeError: as :func:`make_digits`.
  """
  root = Path(cache_dir).expanduser().absolute()
  if is_complete(root, seed=seed, num_train=num_train, num_val=num_val):
    return root
  if progress:
    print(f"[digits] generating dataset at {root} (seed={seed}, train={num_train}, val={num_val})",
          flush=True)
  return make_digits(root, seed=seed, num_train=num_train, num_val=num_val, workers=workers,
                     progress=progress)


def main(argv=None) -> int:
  """Command-line entry point (see the module docstring)."""
  from absl import flags  # pylint: disable=import-outside-toplevel  (command line only)
  from asff_jax import cli  # pylint: disable=import-outside-toplevel  (cli imports TensorFlow; generation does not need it)

  def define(fv, _argv):
    flags.DEFINE_string("out", None, "dataset root to write (replaced if present)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "data seed", flag_values=fv)
    flags.DEFINE_integer("num_train", 3000, "training images", flag_values=fv)
    flags.DEFINE_integer("num_val", 500, "val images", flag_values=fv)
    flags.DEFINE_integer("workers", None, "processes (default: all CPUs)", flag_values=fv)
    flags.DEFINE_bool("quiet", False, "no progress output", flag_values=fv)
    flags.mark_flags_as_required(["out"], flag_values=fv)

  def run(f):
    make_digits(f.out, seed=f.seed, num_train=f.num_train, num_val=f.num_val, workers=f.workers,
                progress=not f.quiet)

  return cli.run(run, "asff_jax.data.make_digits", argv, define)


if __name__ == "__main__":
  sys.exit(main())
