"""Detections on images, folders and videos: ``python -m asff_jax.predict --workdir DIR --inputs ... --out OUT``.

::

    python -m asff_jax.predict --workdir DIR --inputs a.jpg photos/ 'shots/*.png' clip.mp4 --out OUT \\
        [--checkpoint STEP] [--score_thre 0.3] [--max_detections 300] [--fusion-maps] \\
        [--every 1] [--max_frames N] [--config.eval.input_size=416]
    python -m asff_jax.predict --pth YOLOv3-ASFF_40.6.pth --config configs/coco_asff_608.py --inputs ... --out OUT

Inputs (``--inputs``, or its alias ``--images``): image files; folders (every
image inside, recursively: .jpg .jpeg .png .bmp .gif .tif .tiff .webp);
quoted glob patterns; video files (.mp4 .avi .mov .mkv .webm .m4v, decoded
with PyAV). The model is :class:`asff_jax.tools.detector.Detector` (the
official test-time pre- and post-processing, spec §5). Writes, with names
the input's stem, or, when two inputs share a stem (``a/img.jpg``,
``b/img.jpg``), the input's path below the inputs' common folder:

* ``OUT/<path>.png``: the image with boxes, class names and scores drawn;
* ``OUT/detections.json``: ``{"detections": {input path: [{"bbox": [x1, y1, x2,
  y2], "score", "class", "class_name", "category_id"}]}, "failed": {path:
  reason}, ...}`` in original-image pixels (xyxy, clipped to the image);
* videos: ``OUT/<path>.mp4`` (every processed frame annotated, same frame
  rate / ``--every``) and ``OUT/<path>.jsonl`` (one line per processed frame:
  ``{"frame", "time_s", "detections": [...]}``);
* with ``--fusion-maps`` (ASFF models, images): ``OUT/<path>_fusion.png``, the
  paper's Figure 3 — per fused level the image with detections, the fused
  feature map (channel sum) and the fusion weights α/β/γ.

``--max_detections`` raises the per-image cap (``eval.max_detections``, COCO's
100) for crowded scenes.

Errors: an unreadable image or video is reported (file and reason) and
skipped, and the command exits with status 1 after processing the others; an
input that matches nothing is an error (exit 2).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from asff_jax import cli  # first: quiets TensorFlow before it is imported

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

from asff_jax import progress  # noqa: E402
from asff_jax.errors import DataError, MissingFileError  # noqa: E402
from asff_jax.tools.detector import Detections, Detector  # noqa: E402

logger = logging.getLogger("asff_jax")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def load_image(path) -> np.ndarray:
  """``(H, W, 3)`` uint8 RGB with EXIF orientation applied (16-bit scaled to 8).

  Raises:
    DataError: the file is not a readable image (message names the file).
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
    raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
  """Files, folders (recursive) and globs → the sorted, de-duplicated list of image and video files.

  Raises:
    MissingFileError: an input that is neither an existing path nor a glob with matches.
  """
  out: list[Path] = []
  for item in inputs:
    p = Path(item).expanduser()
    if p.is_dir():
      found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
      if not found:
        raise MissingFileError(f"{item}: folder holds no images or videos ({', '.join(IMAGE_EXTENSIONS)})")
      out += found
    elif p.is_file():
      out.append(p)
    else:
      matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True) if Path(m).is_file())
      if not matches:
        raise MissingFileError(f"{item}: no such file or folder, and no file matches it as a pattern")
      out += matches
  seen, unique = set(), []
  for p in out:
    key = p.resolve()
    if key not in seen:
      seen.add(key)
      unique.append(p)
  return unique


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
  """Input → output name without extension: the file's stem when the stems are unique, otherwise
  its path below the inputs' common folder (so same-named files in two folders do not collide)."""
  resolved = [p.resolve() for p in paths]
  if not resolved:
    return {}
  stems = [r.stem for r in resolved]
  if len(set(stems)) == len(stems):
    return dict(zip(paths, stems))
  root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
  return {p: str(r.relative_to(root).with_suffix("")) for p, r in zip(paths, resolved)}


def draw_detections(image: np.ndarray, dets) -> Image.Image:
  """PIL image with boxes and ``name score`` labels drawn on ``image`` (H, W, 3) uint8.

  ``dets``: :class:`~asff_jax.tools.detector.Detections` or a list of row dicts.
  """
  rows = dets.to_list() if isinstance(dets, Detections) else dets
  im = Image.fromarray(image)
  draw = ImageDraw.Draw(im)
  for d in rows:
    x1, y1, x2, y2 = d["bbox"]
    colour = PALETTE[d["class"] % len(PALETTE)]
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
    text = f"{d['class_name']} {d['score']:.2f}"
    tw = draw.textlength(text)
    top = max(y1 - 12, 0)
    draw.rectangle([x1, top, x1 + tw + 4, top + 12], fill=colour)
    draw.text((x1 + 2, top), text, fill=(0, 0, 0))
  return im


def plot_fusion_maps(image: np.ndarray, maps: dict, path) -> None:
  """The paper's Figure 3 for one image: per fused level (rows, stride 32, 16, 8) the image with
  detections, the fused feature map (channel sum) and α/β/γ (the weights of the inputs from
  levels 1/2/3, which sum to 1)."""
  import matplotlib  # pylint: disable=import-outside-toplevel  (heavy; only for --fusion-maps)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel  (as above)

  h, w = image.shape[:2]
  fig, axes = plt.subplots(3, 5, figsize=(16, 3 * 16 / 5 * h / w + 1), constrained_layout=True)
  shown = np.asarray(draw_detections(image, maps["detections"]))
  extent = (0, w, h, 0)  # maps stretched over the image's frame (nearest cells, no smoothing)
  names = ("α (from level 1, stride 32)", "β (from level 2, stride 16)", "γ (from level 3, stride 8)")
  im = None
  for l in range(3):
    axes[l, 0].imshow(shown)
    axes[l, 0].set_title(f"fused level {l + 1} (stride {32 >> l})", fontsize=9)
    fused = np.asarray(maps["fused_sum"][l], np.float32)
    # colour range from the 1st-99th percentiles: a few extreme cells (trained digits models show
    # them in the bottom-left cells) would otherwise flatten the rest of the map to one colour
    lo, hi = np.percentile(fused, [1.0, 99.0])
    axes[l, 1].imshow(fused, cmap="magma", extent=extent, interpolation="nearest", vmin=lo, vmax=max(hi, lo + 1e-6))
    axes[l, 1].set_title("fused feature map (channel sum, 1-99 % range)", fontsize=9)
    for k in range(3):
      ax = axes[l, k + 2]
      im = ax.imshow(np.asarray(maps["weights"][l])[..., k], vmin=0.0, vmax=1.0, cmap="viridis", extent=extent,
                     interpolation="nearest")
      if l == 0:
        ax.set_title(names[k], fontsize=9)
    for ax in axes[l]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(im, ax=axes[:, 2:].ravel().tolist(), shrink=0.6, label="fusion weight")
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _rounded(rows: list[dict]) -> list[dict]:
  """Detections for the JSON files: boxes to 0.01 px, scores to 1e-4."""
  return [dict(d, bbox=[round(v, 2) for v in d["bbox"]], score=round(d["score"], 4)) for d in rows]


def video_frames(path, every: int = 1, max_frames: Optional[int] = None) -> Iterator[tuple[int, float, np.ndarray]]:
  """``(frame index, time in s, (H, W, 3) uint8 RGB)`` of every ``every``-th frame (PyAV).

  Raises:
    DataError: the file cannot be opened or decoded as a video.
  """
  import av  # pylint: disable=import-outside-toplevel  (video inputs only)

  try:
    container = av.open(str(path))
  except Exception as e:  # PyAV raises its own error types  pylint: disable=broad-except
    raise DataError(f"{path}: not a readable video ({type(e).__name__}: {e})") from e
  n = 0
  with container:
    stream = container.streams.video[0]
    for i, frame in enumerate(container.decode(stream)):
      if i % every:
        continue
      t = float(frame.time) if frame.time is not None else i / float(stream.average_rate or 25)
      yield i, t, frame.to_ndarray(format="rgb24")
      n += 1
      if max_frames and n >= max_frames:
        break


def _video_rate(path) -> float:
  import av  # pylint: disable=import-outside-toplevel  (video inputs only)

  try:
    with av.open(str(path)) as c:
      return float(c.streams.video[0].average_rate or 25)
  except Exception as e:  # PyAV raises its own error types  pylint: disable=broad-except
    raise DataError(f"{path}: not a readable video ({type(e).__name__}: {e})") from e


class _VideoWriter:
  """Annotated frames → an MPEG-4 file (PyAV), opened at the first frame (its size sets the stream's)."""

  def __init__(self, path: str, rate: float):
    self.path, self.rate = path, rate
    self._container = self._stream = None

  def write(self, frame: np.ndarray) -> None:
    import av  # pylint: disable=import-outside-toplevel  (video inputs only)

    if self._container is None:
      from fractions import Fraction  # pylint: disable=import-outside-toplevel  (as above)
      self._container = av.open(self.path, mode="w")
      self._stream = self._container.add_stream("mpeg4", rate=Fraction(self.rate).limit_denominator(1000))
      h, w = frame.shape[:2]
      self._stream.width, self._stream.height = w - w % 2, h - h % 2
      self._stream.pix_fmt = "yuv420p"
      self._stream.bit_rate = 4_000_000
    h, w = self._stream.height, self._stream.width
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format="rgb24")
    for packet in self._stream.encode(vf):
      self._container.mux(packet)

  def close(self) -> None:
    if self._container is not None:
      for packet in self._stream.encode():
        self._container.mux(packet)
      self._container.close()


def predict_video(det: Detector, path: Path, out_stem: Path, *, every: int = 1,
                  max_frames: Optional[int] = None) -> int:
  """Detections on every ``every``-th frame: ``<out_stem>.mp4`` (annotated) and ``<out_stem>.jsonl``.

  Returns the number of frames processed. Raises DataError for an unreadable video.
  """
  out_stem.parent.mkdir(parents=True, exist_ok=True)
  frames = video_frames(path, every, max_frames)
  n = 0
  with open(f"{out_stem}.jsonl", "w") as jl:
    writer = _VideoWriter(f"{out_stem}.mp4", _video_rate(path) / every)
    try:
      batch = []
      for item in frames:
        batch.append(item)
        if len(batch) == det.batch_size:
          n += _video_batch(det, batch, jl, writer.write)
          batch = []
      if batch:
        n += _video_batch(det, batch, jl, writer.write)
    finally:
      writer.close()
  return n


def _video_batch(det, batch, jl, write) -> int:
  dets = det([im for _, _, im in batch])
  for (i, t, im), d in zip(batch, dets):
    jl.write(json.dumps({"frame": i, "time_s": round(t, 4), "detections": _rounded(d.to_list())}) + "\n")
    write(np.asarray(draw_detections(im, d)))
  return len(batch)


def predict_inputs(det: Detector, inputs: Sequence[str], out: str, *, fusion_maps: bool = False,
                   every: int = 1, max_frames: Optional[int] = None, show_progress: bool = True) -> dict:
  """Runs ``det`` on images, folders, globs and videos and writes the outputs of the module docstring.

  Returns:
    ``{'detections': {image path: [rows]}, 'videos': {video path: frames}, 'failed': {path: reason}}``
    (rows at full float32 precision; the JSON file rounds boxes to 0.01 px, scores to 1e-4).

  Raises:
    MissingFileError: an input that matches nothing.
  """
  paths = expand_inputs(inputs)
  names = output_names(paths)
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  want_maps = fusion_maps and det.has_fusion_maps
  if fusion_maps and not want_maps:
    logger.warning("--fusion-maps: model.fusion is %r, which has no fusion weights", det.config.model.fusion)
  results, videos, failed = {}, {}, {}
  images = [p for p in paths if p.suffix.lower() not in VIDEO_EXTENSIONS]
  bar = progress.bar(len(images), "predict", unit="img", enabled=show_progress)
  for start in range(0, len(images), det.batch_size):
    chunk, arrays = [], []
    for p in images[start:start + det.batch_size]:
      try:
        arrays.append(load_image(p))
        chunk.append(p)
      except DataError as e:
        failed[str(p)] = str(e)
        logger.warning("skipping %s", e)
    for p, im, d in zip(chunk, arrays, det(arrays) if arrays else []):
      target = out_dir / f"{names[p]}.png"
      target.parent.mkdir(parents=True, exist_ok=True)
      draw_detections(im, d).save(target)
      if want_maps:
        plot_fusion_maps(im, det.fusion_maps(im), out_dir / f"{names[p]}_fusion.png")
      results[str(p)] = d.to_list()
    bar.update(len(images[start:start + det.batch_size]))
  bar.close()
  for p in paths:
    if p.suffix.lower() in VIDEO_EXTENSIONS:
      try:
        videos[str(p)] = predict_video(det, p, out_dir / names[p], every=every, max_frames=max_frames)
        logger.info("%s: %d frames -> %s.mp4, %s.jsonl", p, videos[str(p)], out_dir / names[p], out_dir / names[p])
      except DataError as e:
        failed[str(p)] = str(e)
        logger.warning("skipping %s", e)
  with open(out_dir / "detections.json", "w") as f:
    json.dump({"score_thre": det.score_thre, "input_size": det.input_size,
               "detections": {k: _rounded(v) for k, v in results.items()},
               "videos": videos, "failed": failed}, f, indent=1)
  logger.info("%d images, %d videos -> %s (%d failed)", len(results), len(videos), out_dir, len(failed))
  return {"detections": results, "videos": videos, "failed": failed}


def predict_files(workdir: str, images: Sequence[str], out: str, *, config=None, step=None,
                  score_thre: float = 0.3, fusion_maps: bool = False) -> dict:
  """:func:`predict_inputs` with the detector of ``workdir`` (checkpoint ``step``, default latest)."""
  det = (Detector.from_workdir(workdir, step, score_thre=score_thre) if config is None else
         Detector(config, _load(workdir, step), score_thre=score_thre))
  return predict_inputs(det, images, out, fusion_maps=fusion_maps)


def _load(workdir, step):
  from asff_jax.training import checkpoints  # pylint: disable=import-outside-toplevel  (only with an explicit config)
  return checkpoints.load_variables(workdir, step)[0]


def main(argv=None):
  """CLI entry point (absl flags)."""

  def define(fv, argv_):
    cli.define_model_source_flags(fv, argv_, "asff_jax.predict")
    flags.DEFINE_list("inputs", None, "Images, folders, glob patterns, videos (space- or comma-separated).",
                      flag_values=fv)
    flags.DEFINE_list("images", None, "Alias of --inputs.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_float("score_thre", 0.3, "Minimum score of drawn / written detections.", flag_values=fv)
    flags.DEFINE_integer("max_detections", None, "Detections per image (default eval.max_detections, 100).",
                         flag_values=fv)
    flags.DEFINE_bool("fusion_maps", False, "Also draw the fusion maps (ASFF models, images).", flag_values=fv)
    flags.DEFINE_integer("every", 1, "Videos: process every N-th frame.", flag_values=fv)
    flags.DEFINE_integer("max_frames", None, "Videos: stop after this many processed frames.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Images per forward.", flag_values=fv)
    flags.mark_flags_as_required(["out"], flag_values=fv)

  def run(f):
    inputs = list(f.inputs or []) + list(f.images or [])
    if not inputs:
      raise cli.UserError("--inputs FILES/FOLDERS/GLOBS/VIDEOS is required")
    config = f.config
    if f.max_detections:
      config.eval.max_detections = int(f.max_detections)
    kw = dict(score_thre=f.score_thre, batch_size=f.batch_size)
    if f.pth:
      det = Detector.from_pth(f.pth, config, **kw)
    else:
      det = Detector(config, _load(f.workdir, f.checkpoint), **kw)
    out = predict_inputs(det, inputs, f.out, fusion_maps=f.fusion_maps, every=f.every, max_frames=f.max_frames)
    return 1 if out["failed"] else 0

  return cli.run(run, "asff_jax.predict", argv, define, multi=("inputs", "images"))


if __name__ == "__main__":
  sys.exit(main())
