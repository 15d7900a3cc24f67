"""Benchmarks, run on demand: ``python -m asff_jax.benchmark [--what input] [--quick] [--out F.json]``.

Implemented so far: ``--what input``, the training input pipeline (spec §7-§8):
JPEG decode of both mixup images, mixup, the full official TrainTransform at
608 px, batching — through :func:`asff_jax.data.pipeline.measure_throughput`
with one tf.data thread, on in-memory 640x480 JPEGs (COCO-like size). The
number that matters is *images per CPU-second* (all threads of this process),
i.e. the per-core rate, robust to other load on the machine; it is printed
next to the official PyTorch/OpenCV augmentation's per-core rate measured on
this project's machine (about 29 images/s per core at 608 including JPEG
decode and mixup, issue 7) as a ratio (target ≥ 2).

Model and train-step benchmarks (``--what model|train``) come with the
benchmark issue.

``--quick``: tiny sizes and few batches (CI smoke mode; the numbers are only
checked for consistency).
"""

from __future__ import annotations

import argparse
import json
import sys

#: Official augmentation rate per core on this machine (issue 7), images/s.
OFFICIAL_AUG_IMAGES_PER_CORE = 29.0


def bench_input(quick: bool = False) -> dict:
  """Per-core training-augmentation rate at 608 (or 128 with ``quick``) with and without mixup."""
  from asff_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  size = 128 if quick else 608
  n = 3 if quick else 25
  rows = []
  for mixup in (True, False):
    r = pipeline.measure_throughput(size=size, mixup=mixup, batch_size=8, num_batches=n,
                                    warmup_batches=1 if quick else 3, threads=1)
    r["ratio_to_official_per_core"] = r["images_per_cpu_s"] / OFFICIAL_AUG_IMAGES_PER_CORE
    rows.append(r)
  return {"what": "input", "quick": quick, "official_images_per_core": OFFICIAL_AUG_IMAGES_PER_CORE,
          "results": rows}


def format_input(res: dict) -> str:
  """Table of :func:`bench_input` results."""
  lines = ["input pipeline (1 tf.data thread, 640x480 JPEGs, full official TrainTransform)",
           f"{'size':>5} {'mixup':>6} {'img/s':>8} {'img/CPU-s':>10} {'x official/core':>16}"]
  for r in res["results"]:
    lines.append(f"{r['size']:>5} {str(r['mixup']):>6} {r['images_per_s']:>8.1f} "
                 f"{r['images_per_cpu_s']:>10.1f} {r['ratio_to_official_per_core']:>16.2f}")
  lines.append(f"official PyTorch/OpenCV augmentation: {res['official_images_per_core']:.0f} "
               "images/s per core at 608 (this machine)")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--what", default="input", choices=["input"],
                 help="what to benchmark (model/train: see the benchmark issue)")
  p.add_argument("--quick", action="store_true", help="tiny sizes, few batches (CI smoke mode)")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  args = p.parse_args(argv)
  res = bench_input(args.quick)
  print(format_input(res))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
