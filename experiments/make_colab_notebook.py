"""Writes ``experiments/asff_jax_colab.ipynb`` from the cell sources below (edit here, then run).

    python experiments/make_colab_notebook.py

The notebook is checked in; ``tests/test_notebook.py`` executes it unmodified
(every code cell, a fresh kernel) and fails if this script would write a
different notebook.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("asff_jax_colab.ipynb")

CELLS = [
    ("markdown", r"""# asff_jax on Colab (CPU, GPU or TPU)

ASFF ("Learning Spatial Fusion for Single-Shot Object Detection", Liu, Huang, Wang 2019) in JAX/Flax.
This notebook installs the package, trains the default config on the built-in `digits` dataset for a
few minutes, evaluates it with COCO metrics, draws detections and the learned fusion (paper Figure 3:
the fused feature maps and the weights α/β/γ), and measures the paper's gradient-consistency argument
(§3.3, Eq. 3–6) with a jitted probe.

Pick a runtime (Runtime → Change runtime type). What to expect, per runtime (the training cell sizes
the run to it):

| runtime | batch × steps | time | what it reaches |
|---|---|---|---|
| CPU (2 cores) | 2 × 800 | ≈ 4 min of training (3.3 min of steps, 35 s of compilation), 6 min for the whole notebook, on this project's 2-core machine | AP50 ≈ 0.05 (class-agnostic AP50 0.32): boxes found, classes barely (one run, 2026-12-08, the default of that day with its EMA cut to the short run; the full CPU run is `configs/default.py`, 3,500 steps, 17 min, AP50 0.57) |
| GPU | 16 × 2,000 | not measured (no GPU runtime was available when this was written) | — |
| TPU (8 cores) | 16 × 2,000 | not measured | — |

Outside Colab (a checkout with `pip install -e .` done) the install cell does nothing.
"""),
    ("code", r"""# Install. On Colab: clone the repository (set REPO_URL to your copy) and install it with the JAX
# build that matches the runtime, keeping Colab's TensorFlow. Elsewhere: nothing to do.
import os, subprocess, sys

REPO_URL = "https://github.com/asff-jax/asff_jax"  # @param {type:"string"}
ON_COLAB = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ

def sh(*cmd):
  print("$", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)

if ON_COLAB:
  if os.path.exists("/dev/accel0") or "TPU_ACCELERATOR_TYPE" in os.environ or "COLAB_TPU_ADDR" in os.environ:
    jax_pkg = "jax[tpu]"
  elif subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0:
    jax_pkg = "jax[cuda12]"
  else:
    jax_pkg = "jax"
  if not os.path.exists("asff_jax_repo"):
    sh("git", "clone", "-q", "--depth=1", REPO_URL, "asff_jax_repo")
  sh(sys.executable, "-m", "pip", "install", "-q", "-U", jax_pkg, "flax", "optax", "orbax-checkpoint")
  # --no-deps: Colab's TensorFlow serves tf.data (a second, CPU-only TensorFlow would be installed otherwise)
  sh(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "asff_jax_repo")
  sh(sys.executable, "-m", "pip", "install", "-q", "tensorflow-datasets", "pycocotools", "ml-collections", "clu",
     "tqdm", "av", "scikit-image", "scikit-learn")
  os.chdir("asff_jax_repo")
else:
  import asff_jax  # a checkout with the package installed (pip install -e .)
  while not os.path.exists("pyproject.toml") and os.path.dirname(os.getcwd()) != os.getcwd():
    os.chdir("..")  # to the repository root: the configs are read from there
print("working in", os.getcwd())"""),
    ("code", r"""# The runtime, and a run sized to it. ASFF_NB_SIZE=tiny (set by the project's CI) is a seconds-long
# smoke run: a 1/8-width model on a tiny generated digits set.
import tempfile
import jax
from asff_jax import cli
from asff_jax.config import load_config_file

cli.setup_logging()  # progress lines for the training and evaluation below
devices = jax.devices()
kind, n_dev = devices[0].platform, len(devices)
print(f"{n_dev} x {devices[0].device_kind} ({kind})")
SIZE = os.environ.get("ASFF_NB_SIZE", "full")
WORKDIR = os.environ.get("ASFF_NB_WORKDIR", "/content/asff_run" if ON_COLAB else "runs/colab")

if SIZE == "tiny":
  config = load_config_file("configs/tiny.py")
  tmp = tempfile.mkdtemp()
  config.dataset.source, config.dataset.root = "digits", os.path.join(tmp, "digits")
  config.dataset.data_dir = os.path.join(tmp, "tfds")
  config.dataset.digits_num_train, config.dataset.digits_num_val = 24, 6
  config.dataset.max_boxes, config.model.num_classes = 12, 10
  batch, steps = 2 * n_dev, 2
else:
  config = load_config_file("configs/default.py")
  batch, steps = (2, 800) if kind == "cpu" else (16, 2000)
  batch = -(-batch // n_dev) * n_dev  # a multiple of the device count
config.batch_size, config.num_train_steps = batch, steps
config.checkpoint_every_steps, config.eval_every_steps, config.eval_at_end = steps, 0, False
config.log_every_steps = max(1, steps // 20)
print(f"batch {batch} x {steps} steps, workdir {WORKDIR}")"""),
    ("markdown", r"""## Train

Warm-up and cosine adapt to the short run (a warning says how). The run resumes if `WORKDIR` already
has checkpoints."""),
    ("code", r"""from asff_jax.train import train_and_evaluate

state = train_and_evaluate(config, WORKDIR)"""),
    ("markdown", "## Evaluate (COCO AP on the val split)"),
    ("code", r"""from asff_jax.evaluation import evaluator

metrics = evaluator.evaluate_workdir(WORKDIR)
print(evaluator.format_metrics(metrics))"""),
    ("markdown", r"""## Detections and the learned fusion (paper Figure 3)

`Detector` is the Python API: an RGB uint8 image in, boxes in the image's pixels out."""),
    ("code", r"""import json
from asff_jax import Detector
from asff_jax.data.sources import DEFAULT_DIGITS_DIR
from asff_jax.tools import predict

det = Detector.from_workdir(WORKDIR, score_thre=0.2)
root = os.path.expanduser(config.dataset.root or DEFAULT_DIGITS_DIR)
split = config.dataset.eval_split
with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
  files = [os.path.join(root, split, im["file_name"]) for im in json.load(f)["images"][:2]]
image = predict.load_image(files[0])
found = det(image)
print(f"{len(found)} detections:", [(n, round(float(s), 2)) for n, s in zip(found.class_names, found.scores)][:10])
os.makedirs(os.path.join(WORKDIR, "figures"), exist_ok=True)
figure = os.path.join(WORKDIR, "figures", "figure3.png")
predict.plot_fusion_maps(image, det.fusion_maps(image), figure)
try:
  from IPython.display import Image, display
  display(predict.draw_detections(image, found))
  display(Image(figure))
except ImportError:
  pass"""),
    ("markdown", r"""## Gradient-consistency probe (paper §3.3)

For one training batch, the gradient reaching each level's feature x^n is split by the fused output
y^l it arrives through (Eq. 3): c^{n,l} = ∂L_l/∂x^n. At the positives of level n: each path's share of
the gradient norm, the cosine between the own-level term and the sum of the others (negative =
conflict), and for ASFF the learned weights there (Eq. 6). `experiments/README.md` has the
measurement along a full training run."""),
    ("code", r"""import numpy as np
from asff_jax.config import resolve_config
from asff_jax.data import loader
from asff_jax.tools import probes
from asff_jax.training import checkpoints

cfg = resolve_config(config, **loader.dataset_info(loader.train_source(config)))
batch = next(loader.make_train_iterator(cfg, 0))
variables, _ = checkpoints.load_variables(WORKDIR)
probe = jax.jit(lambda v, x, y: probes.decompose_gradients(det.model, v, x, y, loss_config=cfg.loss))
summary = probes.summarize(jax.tree.map(np.asarray, probe(variables, batch["images"], batch["labels"])))
for n, s in summary.items():
  print(f"level {n}: positives {s['num_positive']}, share by path {np.round(s['share'], 3)}, "
        f"cos(own, others) {s['cos_own_vs_others']:+.3f}, conflict {s['conflict_frac']:.2f}"
        + (f", w_self {s['w_self']:.3f}" if "w_self" in s else ""))"""),
]


def notebook() -> dict:
  cells = []
  for i, (kind, src) in enumerate(CELLS):
    lines = src.splitlines(keepends=True)
    cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": lines}
    if kind == "code":
      cell.update(execution_count=None, outputs=[])
    cells.append(cell)
  return {"cells": cells, "metadata": {"accelerator": "GPU", "colab": {"provenance": []},
                                       "kernelspec": {"display_name": "Python 3", "name": "python3"},
                                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}


def render() -> str:
  return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
  OUT.write_text(render())
  print(f"wrote {OUT}")
  sys.exit(0)
