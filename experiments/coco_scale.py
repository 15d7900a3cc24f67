"""The COCO-scale data path measured: preparing a train2017-sized COCO folder and opening it again.

::

    python experiments/coco_scale.py --out /tmp/coco_scale [--num_images 118287] [--boxes_per_image 7.3]

Generates ``OUT/coco/annotations/instances_train2017.json`` with COCO train2017's
shape — 118,287 images, ~860,000 boxes (COCO's 7.3 per image, a geometric
count distribution with its long tail), 80 categories with COCO's id gaps
(1..90), ~1 % crowd boxes — whose images are hard links to a few copies of one small JPEG
(so the disk holds one image per 50,000; the annotation json is real-sized). Then, each
in a fresh process so that time and peak memory are its own:

1. ``prepare``: :func:`asff_jax.data.coco_folder.prepare_coco_folder` (validate,
   decode every image, write the array_record records, gt.json and the report);
2. ``open``: :func:`asff_jax.data.sources.open_source` on the prepared split
   (what every later run pays at start-up), and reading 1,000 random records.

Prints one line per phase and writes ``OUT/coco_scale.json``. The record of
the measured runs is ``experiments/coco_scale.md``; ``tests/test_experiments.py``
runs this at a tiny size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

#: COCO's 80 category ids (1..90 with gaps).
COCO_CATEGORY_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
                     25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49,
                     50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74,
                     75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]
IMAGE_HW = (48, 64)  # the shared image files (their size is what the json says)
LINKS_PER_FILE = 50000


def generate(root: Path, num_images: int, boxes_per_image: float, seed: int = 0,
             image_hw=IMAGE_HW) -> dict:
  """Writes the annotation json and the hard-linked images; returns counts and timings."""
  t0 = time.time()
  rng = np.random.default_rng(seed)
  split_dir = root / "train2017"
  split_dir.mkdir(parents=True, exist_ok=True)
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  h, w = image_hw
  # a smooth photo-like image (noise would make a JPEG several times larger than a photo's)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
  pixels = Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
  shared = None
  images, annotations = [], []
  # geometric counts with COCO's mean; ~1 % of images without boxes, as in train2017
  p = 1.0 / (boxes_per_image + 1.0)
  counts = rng.geometric(p, num_images) - 1
  for i in range(num_images):
    image_id = 100000 + 7 * i  # sparse ids, like COCO's
    name = f"{image_id:012d}.jpg"
    link = split_dir / name
    if i % LINKS_PER_FILE == 0:  # file systems cap hard links per file (ext4: 65,000)
      shared = root / f"shared_{i // LINKS_PER_FILE}.jpg"
      pixels.save(shared, quality=90)
    if not link.exists():
      os.link(shared, link)
    images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    n = int(counts[i])
    if n:
      bw = rng.uniform(0.02, 0.9, n) * w
      bh = rng.uniform(0.02, 0.9, n) * h
      x = rng.uniform(0, 1, n) * (w - bw)
      y = rng.uniform(0, 1, n) * (h - bh)
      cats = rng.choice(COCO_CATEGORY_IDS, n)
      crowd = rng.random(n) < 0.01
      for k in range(n):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": int(cats[k]), "iscrowd": int(crowd[k]),
                            "bbox": [round(float(x[k]), 2), round(float(y[k]), 2),
                                     round(float(bw[k]), 2), round(float(bh[k]), 2)],
                            "area": round(float(bw[k] * bh[k]), 2)})
  categories = [{"id": c, "name": f"category_{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
  path = root / "annotations" / "instances_train2017.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
  return {"images": num_images, "boxes": len(annotations), "json_mb": path.stat().st_size / 2**20,
          "generate_s": time.time() - t0}


def _phase(phase: str, root: Path, data_dir: Path) -> dict:
  """Runs one phase in this process (called in a child); returns its numbers (imports not timed)."""
  # pylint: disable=import-outside-toplevel  (child only: the parent stays light)
  from asff_jax import config as config_lib
  from asff_jax.data import coco_folder
  from asff_jax.data.sources import open_source
  t0 = time.time()
  if phase == "prepare":
    prepared = coco_folder.prepare_coco_folder(root, "train2017", data_dir, progress_every=20000)
    seconds = time.time() - t0
    counts = prepared.report["counts"]
    return {"prepare_s": seconds, "records": counts["images_kept"], "boxes_kept": counts["boxes_kept"],
            "records_per_s": counts["images_kept"] / seconds,
            "prepared_mb": sum(f.stat().st_size for f in prepared.version_dir.iterdir()) / 2**20}
  cfg = config_lib.default_config().dataset
  with cfg.unlocked():
    cfg.source, cfg.root, cfg.data_dir = "coco_folder", str(root), str(data_dir)
  source = open_source(cfg, "train2017", num_classes=80)
  opened = time.time() - t0
  rng = np.random.default_rng(0)
  t1 = time.time()
  for i in rng.integers(0, len(source), 1000):
    source[int(i)]
  return {"open_s": opened, "records": len(source), "read_1000_random_s": time.time() - t1}


def run_phase(phase: str, root: Path, data_dir: Path) -> dict:
  """``phase`` in a fresh Python process; adds its wall time (imports included) and peak resident memory."""
  t0 = time.time()
  r = subprocess.run([sys.executable, __file__, "--_phase", phase, "--out", str(root.parent),
                      "--data_dir", str(data_dir)], capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(f"{phase} failed:\n{r.stderr[-3000:]}")
  result = json.loads(r.stdout.strip().splitlines()[-1])
  result[f"{phase}_process_s"] = time.time() - t0
  result[f"{phase}_peak_rss_mb"] = result.pop("peak_rss_mb")
  return result


def main(argv=None) -> int:
  """Command line (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="work folder (the dataset, prepared data, results)")
  p.add_argument("--num_images", type=int, default=118287)
  p.add_argument("--boxes_per_image", type=float, default=7.3)
  p.add_argument("--image_hw", default="48,64", help="H,W of the shared image (640x480 photos: 480,640)")
  p.add_argument("--data_dir", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_phase", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  out = Path(a.out)
  root = out / "coco"
  data_dir = Path(a.data_dir) if a.data_dir else out / "tfds"
  if a._phase:  # pylint: disable=protected-access
    result = _phase(a._phase, root, data_dir)  # pylint: disable=protected-access
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return 0
  if not (root / "annotations" / "instances_train2017.json").exists():
    gen = generate(root, a.num_images, a.boxes_per_image,
                   image_hw=tuple(int(v) for v in a.image_hw.split(",")))
    print(f"generated {gen['images']} images, {gen['boxes']} boxes, json {gen['json_mb']:.0f} MB "
          f"in {gen['generate_s']:.0f} s", flush=True)
  else:
    gen = {}
  prep = run_phase("prepare", root, data_dir)
  print(f"prepare: {prep['prepare_s']:.0f} s ({prep['records_per_s']:.0f} records/s, "
        f"{prep['records']} records, {prep['boxes_kept']} boxes), peak RSS {prep['prepare_peak_rss_mb']:.0f} MB, "
        f"prepared data {prep['prepared_mb']:.0f} MB", flush=True)
  opened = run_phase("open", root, data_dir)
  print(f"open_source (prepared): {opened['open_s']:.1f} s; 1,000 random records in "
        f"{opened['read_1000_random_s']:.2f} s; process {opened['open_process_s']:.1f} s, peak RSS "
        f"{opened['open_peak_rss_mb']:.0f} MB",
        flush=True)
  result = {"date": time.strftime("%Y-%m-%d"), "image_hw": a.image_hw, **gen, **prep, **opened}
  (out / "coco_scale.json").write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
