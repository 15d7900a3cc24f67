"""Detections on image files: ``python -m asff_jax.predict --workdir DIR --images A.jpg ... --out OUT``.

::

    python -m asff_jax.predict --workdir DIR --images a.jpg b.png --out OUT \\
        [--checkpoint STEP] [--score_thre 0.3] [--fusion-maps] [--config.eval.input_size=416]

For each image (decoded with PIL, EXIF orientation applied, converted to RGB)
the model of checkpoint ``STEP`` (default latest) of ``DIR`` runs at the
evaluation size with the official test-time pre-processing (plain resize,
ImageNet normalisation; spec §5) and post-processing (score = objectness ×
class probability, per-class NMS ``eval.nms_thre``, at most
``eval.max_detections``). Writes

* ``OUT/<stem>.png``: the image with boxes, class names and scores drawn
  (detections with score ≥ ``--score_thre``);
* ``OUT/detections.json``: ``{file: [{"bbox": [x1, y1, x2, y2], "score",
  "class", "class_name", "category_id"}]}`` in original-image pixels (xyxy,
  continuous corners, clipped to the image), every detection above ``--score_thre``;
* with ``--fusion-maps`` (ASFF models): ``OUT/<stem>_fusion.png``, the learned
  fusion weights α/β/γ (paper Eq. 1-2) of the three fused levels as heat maps
  with the detections — the paper's Figure 3.

Class names come from ``dataset.class_names`` in the saved config (written by
training runs); otherwise they are the class indices.

Errors: an unreadable image is reported (file and reason) and skipped, and the
command exits with status 1 after processing the others; missing workdir or
checkpoint raise ``FileNotFoundError``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from asff_jax import cli  # first: quiets TensorFlow before it is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

from asff_jax.boxes import rescale_boxes  # noqa: E402
from asff_jax.config import load_workdir_config  # noqa: E402
from asff_jax.data import loader, transforms  # noqa: E402
from asff_jax.evaluation import inference  # noqa: E402
from asff_jax.models import create_model  # noqa: E402
from asff_jax.training import checkpoints  # noqa: E402


def load_image(path) -> np.ndarray:
  """``(H, W, 3)`` uint8 RGB with EXIF orientation applied.

  Raises:
    ValueError: the file is not a readable image (message names the file).
  """
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, np.float64)
        arr = (255.0 * arr / max(float(arr.max()), 1.0)).astype(np.uint8)
        return np.repeat(arr[..., None], 3, -1)
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # PIL raises many types for bad files
    raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
  """Official ValTransform (spec §5): bilinear resize to ``(size, size)``, ImageNet mean/std.

  ``image`` (H, W, 3) uint8 RGB → (size, size, 3) float32.
  """
  return np.asarray(transforms.val_transform(image, size), np.float32)


def draw_detections(image: np.ndarray, dets: Sequence[dict]):
  """PIL image with boxes and ``name score`` labels drawn on ``image`` (H, W, 3) uint8."""
  im = Image.fromarray(image)
  draw = ImageDraw.Draw(im)
  palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
             (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
  for d in dets:
    x1, y1, x2, y2 = d["bbox"]
    colour = palette[d["class"] % len(palette)]
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
    text = f"{d['class_name']} {d['score']:.2f}"
    tw = draw.textlength(text)
    draw.rectangle([x1, max(y1 - 12, 0), x1 + tw + 4, max(y1 - 12, 0) + 12], fill=colour)
    draw.text((x1 + 2, max(y1 - 12, 0)), text, fill=(0, 0, 0))
  return im


def plot_fusion_maps(image: np.ndarray, dets: Sequence[dict], fusion_weights, path) -> None:
  """Figure 3 style: the image with detections, and α/β/γ of each fused level (3 × 3 heat maps).

  ``fusion_weights``: list over levels l = 0, 1, 2 (strides 32, 16, 8) of
  ``(H_l, W_l, 3)`` weights for the inputs from levels 0/1/2 (they sum to 1).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel  (heavy; only for --fusion-maps)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel  (as above)

  fig, axes = plt.subplots(3, 4, figsize=(13, 9.5))
  shown = np.asarray(draw_detections(image, dets))
  names = ("α (from level 1, stride 32)", "β (from level 2, stride 16)", "γ (from level 3, stride 8)")
  for l in range(3):
    axes[l, 0].imshow(shown)
    axes[l, 0].set_title(f"fused level {l + 1} (stride {32 >> l})", fontsize=9)
    for k in range(3):
      ax = axes[l, k + 1]
      im = ax.imshow(np.asarray(fusion_weights[l])[..., k], vmin=0.0, vmax=1.0, cmap="viridis")
      if l == 0:
        ax.set_title(names[k], fontsize=9)
    for ax in axes[l]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.6)
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _rounded(det: dict) -> dict:
  """A detection for the JSON file: box to 0.01 px, score to 1e-4."""
  return dict(det, bbox=[round(v, 2) for v in det["bbox"]], score=round(det["score"], 4))


def predict_files(workdir: str, images: Sequence[str], out: str, *, config=None, step=None,
                  score_thre: float = 0.3, fusion_maps: bool = False, log=print) -> dict:
  """Runs the checkpoint on ``images`` and writes the outputs described in the module docstring.

  Returns:
    ``{'detections': {file: [...]}, 'failed': {file: reason}, 'step': int}``
    (full float32 precision; the JSON file rounds boxes to 0.01 px, scores to 1e-4).
  """
  if config is None:
    config = load_workdir_config(workdir)
  variables, step = checkpoints.load_variables(workdir, step)
  model = create_model(config)
  size = loader.eval_input_size(config)
  settings = inference.eval_settings(config)
  settings["conf_thre"] = min(settings["conf_thre"], float(score_thre))
  want_maps = fusion_maps and config.model.fusion == "asff"
  if fusion_maps and not want_maps:
    log(f"--fusion-maps: model.fusion is {config.model.fusion!r}, which has no fusion weights")
  predict = inference.make_predict_fn(model, with_fusion_maps=want_maps, **settings)
  variables = jax.device_put(variables)
  names = list(config.dataset.class_names)
  cat_ids = list(config.dataset.category_ids)
  os.makedirs(out, exist_ok=True)
  results, failed = {}, {}
  for path in images:
    try:
      image = load_image(path)
    except (ValueError, OSError) as e:
      failed[str(path)] = str(e)
      log(f"skipping {e}")
      continue
    x = preprocess(image, size)[None]
    res = jax.tree.map(np.asarray, predict(variables, x))
    k = int(res["num_valid"][0])
    boxes = rescale_boxes(res["boxes"][0, :k], (size, size), image.shape[:2])
    h, w = image.shape[:2]
    boxes = np.clip(boxes, 0.0, np.array([w, h, w, h], np.float32))
    dets = []
    for b, s, c in zip(boxes, res["scores"][0, :k], res["classes"][0, :k]):
      if float(s) < score_thre:
        continue
      c = int(c)
      dets.append({"bbox": [float(v) for v in b], "score": float(s),
                   "class": c, "class_name": names[c] if c < len(names) else str(c),
                   "category_id": int(cat_ids[c]) if c < len(cat_ids) else c})
    stem = Path(path).stem
    draw_detections(image, dets).save(os.path.join(out, f"{stem}.png"))
    if want_maps:
      plot_fusion_maps(image, dets, [w[0] for w in res["fusion_weights"]],
                       os.path.join(out, f"{stem}_fusion.png"))
    results[str(path)] = dets
    log(f"{path}: {len(dets)} detections")
  with open(os.path.join(out, "detections.json"), "w") as f:
    json.dump({"step": int(step), "score_thre": score_thre, "input_size": size,
               "detections": {k: [_rounded(d) for d in v] for k, v in results.items()},
               "failed": failed}, f, indent=1)
  return {"detections": results, "failed": failed, "step": int(step)}


def main(argv=None):
  """CLI entry point (absl flags)."""

  def define(fv, argv_):
    cli.define_model_source_flags(fv, argv_, "asff_jax.predict", allow_pth=False)
    flags.DEFINE_list("images", None, "Image files (comma-separated, or space-separated after the flag).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_float("score_thre", 0.3, "Minimum score of drawn / written detections.", flag_values=fv)
    flags.DEFINE_bool("fusion_maps", False, "Also write the α/β/γ fusion maps (ASFF models).", flag_values=fv)
    flags.mark_flags_as_required(["images", "out"], flag_values=fv)

  def run(f):
    out = predict_files(f.workdir, f.images, f.out, config=f.config, step=f.checkpoint,
                        score_thre=f.score_thre, fusion_maps=f.fusion_maps)
    return 1 if out["failed"] else 0

  return cli.run(run, "asff_jax.predict", argv, define, multi=("images",))


if __name__ == "__main__":
  sys.exit(main())
