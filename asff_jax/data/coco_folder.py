"""Validate a COCO-layout folder and prepare it once as a random-access TFDS dataset.

What
----
Any local folder in COCO's layout::

  ROOT/annotations/instances_<split>.json
  ROOT/<split>/<file_name>            (file_name as given in the json's "images")

is read **without network access**, every image and annotation is checked
(policy table below), and the surviving records are written once with TFDS
(``file_format='array_record'``, so records are random-access through
``builder.as_data_source()``) under ``DATA_DIR``::

  DATA_DIR/asff_coco_folder/<split>_<hash16>/1.0.0/
      asff_coco_folder-<split>.array_record-00000-of-0000N   (the records)
      dataset_info.json, features.json                        (TFDS metadata)
      gt.json              cleaned COCO ground truth for evaluation
      prepare_report.json  counts of every problem found, skipped files, categories

``<hash16>`` is the first 16 hex digits of a SHA-256 over the annotation json's
bytes, the absolute root path, the split, :data:`PREP_VERSION` and the
preparation options: two folders never collide and an edited json is prepared
again (into a new directory; the stale one is left in place). Edits to image
files alone are *not* detected — delete the prepared directory after changing
images in place. The extra files are written into TFDS's temporary directory
before it is renamed into place, so a prepared directory is always complete.
Prepare in one process before multi-process / multi-host training (e.g. with
the command line below); concurrent first-time preparation of the same
folder is not supported.

Record format (one per kept image, in the json's image order)
-------------------------------------------------------------
``image`` bytes — the encoded file: the original bytes when they already are an
8-bit RGB JPEG or 8-bit RGB PNG without an EXIF rotation, otherwise the
converted upright 8-bit RGB image re-encoded (JPEG quality 95 when the source
was a JPEG, else PNG); ``image_id`` int64 (original id); ``height``/``width``
int32 (of the stored image); ``boxes`` float32 (N, 4) ``[x1, y1, x2, y2]`` in
stored-image pixels, continuous corners (``x2 = x + w``, clipped to
``[0, width] x [0, height]``); ``classes`` int32 (N,) — index of the
category id in the sorted category ids; ``is_crowd`` bool (N,);
``file_name`` text. Crowd boxes are always stored (``use_crowd`` is applied
when reading, see :mod:`asff_jax.data.sources`).

``gt.json`` holds ``images`` (original ids, ``file_name``, the *stored*
``width``/``height``), ``annotations`` (the kept ones with their original ids,
the cleaned ``bbox`` ``[x, y, w, h]`` in stored pixels, ``area`` (the json's
``area``, or ``w*h`` when absent, times the downscale factor squared),
``iscrowd`` (crowd kept with ``iscrowd=1`` so pycocotools treats them as ignore
regions), ``category_id``; no ``segmentation``) and the json's ``categories``.
It lists every kept image, including those without annotations.

Bad-data policy
---------------
Every problem is either handled and counted (the counts are printed as a
summary, returned, and stored in ``prepare_report.json``; individual files are
named in ``logging`` warnings, at most :data:`MAX_LOG_LINES` per kind, and all
skipped files are listed in the report) or rejected with a
:class:`CocoFormatError` naming the json file and the problem.

==========================================  ===============================================  ===========================
problem                                     action                                           count key
==========================================  ===============================================  ===========================
json unreadable / not JSON / not an object  FATAL (names the file)                           —
missing or mistyped required key            FATAL (names file, entry and key)                —
  (``images``/``annotations``/``categories`` lists; image ``id``, ``file_name``,
  ``width``, ``height``; annotation ``id``, ``image_id``, ``category_id``,
  ``bbox`` = 4 numbers; category ``id``, ``name``)
duplicate image id / category id            FATAL (names the id)                             —
duplicate annotation id                     keep both; later copies get fresh ids            ``ann_duplicate_id``
                                            (max id + k) in gt.json (pycocotools indexes
                                            annotations by id and would silently merge them)
annotation of an unknown image id           drop                                             ``ann_unknown_image``
unknown category id                         drop box, warn once naming the id                ``box_unknown_category``
NaN / inf / any abs(coordinate) > 1e6       drop box                                         ``box_absurd``
zero or negative width/height               drop box                                         ``box_nonpositive``
box partly outside the image                clip to the image                                ``box_clipped``
box fully outside (nothing left after clip) drop box                                         ``box_outside``
image file missing                          skip image (and its annotations)                 ``image_missing``
zero-byte file                              skip image                                       ``image_empty``
corrupt / truncated / not an image          skip image                                       ``image_unreadable``
side < 2 px (e.g. 1x1)                      skip image (unusable)                            ``image_too_small``
grayscale / palette / RGBA / CMYK / 16-bit  convert to 8-bit RGB (alpha dropped as           ``image_converted``
  / non-JPEG-PNG format                     ``cv2.imread`` does; 16-bit scaled by 1/257)
EXIF orientation 2..8                       apply it (store the upright image)               ``image_exif_rotated``
json w/h == raw (pre-EXIF) size, rotated    boxes are in raw coordinates: rotate them too    ``image_exif_boxes_rotated``
json w/h disagree with the stored file      use the file's size, clip boxes                  ``image_size_mismatch``
longer side > max_image_side (4096)         downscale (longer side = max_image_side),        ``image_downscaled``
                                            boxes, area and gt.json scaled alike
image without annotations in the json       keep (training: background image; eval: listed)  ``image_no_annotations``
image whose boxes were all dropped          keep as above                                    ``image_all_boxes_dropped``
==========================================  ===============================================  ===========================

EXIF decision: COCO's json ``width``/``height`` describe the upright image
(the way viewers show it), so by default boxes are taken as upright
coordinates. Only when the json size equals the *raw* (pre-rotation) size and
differs from the upright size (orientations 5-8 on non-square images) are the
boxes known to be in raw coordinates; they are then rotated with the image.

Command line::

  python -m asff_jax.data.coco_folder --root ROOT --split val2017 --data-dir DATA_DIR
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from asff_jax.errors import DataError

__all__ = [
    "BUILDER_NAME", "COUNT_KEYS", "CocoFormatError", "DEFAULT_MAX_IMAGE_SIDE", "PREP_VERSION",
    "PreparedSplit", "annotation_path", "load_annotations", "normalise_image",
    "prepare_coco_folder",
]

logger = logging.getLogger(__name__)

PREP_VERSION = "1.0.0"
BUILDER_NAME = "asff_coco_folder"
DEFAULT_MAX_IMAGE_SIDE = 4096
MIN_IMAGE_SIDE = 2          # images with a side below this are unusable
ABSURD_COORD = 1e6          # |bbox value| above this (pixels) is treated as garbage
CLIP_TOLERANCE = 1e-3       # px; smaller clips are float noise and not counted
JPEG_QUALITY = 95
MAX_LOG_LINES = 20          # per problem kind
GT_FILE = "gt.json"
REPORT_FILE = "prepare_report.json"

COUNT_KEYS = (
    "images_in_json", "images_kept", "annotations_in_json", "boxes_kept", "crowd_boxes_kept",
    "image_missing", "image_empty", "image_unreadable", "image_too_small", "image_converted",
    "image_reencoded", "image_exif_rotated", "image_exif_boxes_rotated", "image_size_mismatch",
    "image_downscaled", "image_no_annotations", "image_all_boxes_dropped",
    "ann_duplicate_id", "ann_unknown_image", "box_unknown_category", "box_absurd",
    "box_nonpositive", "box_clipped", "box_outside",
)


class CocoFormatError(DataError):
  """A fatal problem in a COCO annotation json (the message names file and key)."""


def annotation_path(root, split: str) -> Path:
  """``root/annotations/instances_<split>.json``, or COCO's images-only ``image_info_<split>.json``.

  The instances file wins when both exist; when neither does the instances
  path is returned (the error then names it).
  """
  ann = Path(root) / "annotations"
  instances, info = ann / f"instances_{split}.json", ann / f"image_info_{split}.json"
  return info if info.exists() and not instances.exists() else instances


def image_folder(root, split: str) -> Path:
  """``root/<split>``; for COCO's ``test-dev<year>`` (whose images live in ``test<year>/``) that folder."""
  folder = Path(root) / split
  m = re.fullmatch(r"test-dev(\d{4})", split)
  if not folder.exists() and m:
    return Path(root) / f"test{m.group(1)}"
  return folder


def is_images_only(data: dict) -> bool:
  """An images-only split (COCO test-dev's ``image_info_*.json``): no ``annotations`` key."""
  return "annotations" not in data


# ---------------------------------------------------------------------------
# json validation
# ---------------------------------------------------------------------------

def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(entry: Any, key: str, kind: str, index: int, path, check, what: str):
  if not isinstance(entry, dict):
    raise CocoFormatError(f"{path}: {kind}[{index}] is not an object")
  if key not in entry:
    ident = f" (id {entry['id']})" if "id" in entry else ""
    raise CocoFormatError(f"{path}: {kind}[{index}]{ident} is missing required key '{key}'")
  if not check(entry[key]):
    ident = f" (id {entry['id']})" if "id" in entry else ""
    raise CocoFormatError(f"{path}: {kind}[{index}]{ident} key '{key}' must be {what}, "
                          f"got {entry[key]!r}")
  return entry[key]


def load_annotations(json_path) -> dict:
  """Load and structurally validate a COCO instances json.

  Args:
    json_path: path of ``instances_<split>.json``.

  Returns:
    The parsed dict (unchanged).

  Raises:
    CocoFormatError: file missing/unreadable, not JSON, missing or mistyped
      required key, duplicate image or category id — the message names the
      file, the entry and the key/id.
  """
  path = Path(json_path)
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise CocoFormatError(f"{path}: annotation json not found") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CocoFormatError(f"{path}: malformed json: {e}") from e
  if not isinstance(data, dict):
    raise CocoFormatError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
  # images only (COCO test-dev's image_info_*.json): no 'annotations' needed
  for key in ("images", "categories") if path.name.startswith("image_info_") else (
      "images", "annotations", "categories"):
    if key not in data:
      raise CocoFormatError(f"{path}: missing required top-level key '{key}'")
    if not isinstance(data[key], list):
      raise CocoFormatError(f"{path}: top-level key '{key}' must be a list")
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  seen = set()
  for i, im in enumerate(data["images"]):
    _require(im, "id", "images", i, path, is_int, "an integer")
    _require(im, "file_name", "images", i, path, lambda v: isinstance(v, str) and v, "a string")
    _require(im, "width", "images", i, path, _is_number, "a number")
    _require(im, "height", "images", i, path, _is_number, "a number")
    if im["id"] in seen:
      raise CocoFormatError(f"{path}: duplicate image id {im['id']}")
    seen.add(im["id"])
  seen = set()
  for i, c in enumerate(data["categories"]):
    _require(c, "id", "categories", i, path, is_int, "an integer")
    _require(c, "name", "categories", i, path, lambda v: isinstance(v, str), "a string")
    if c["id"] in seen:
      raise CocoFormatError(f"{path}: duplicate category id {c['id']}")
    seen.add(c["id"])
  if not data["categories"]:
    raise CocoFormatError(f"{path}: 'categories' is empty")
  bbox_ok = lambda v: isinstance(v, (list, tuple)) and len(v) == 4 and all(map(_is_number, v))
  for i, a in enumerate(data.get("annotations", [])):
    _require(a, "id", "annotations", i, path, is_int, "an integer")
    _require(a, "image_id", "annotations", i, path, is_int, "an integer")
    _require(a, "category_id", "annotations", i, path, is_int, "an integer")
    _require(a, "bbox", "annotations", i, path, bbox_ok, "a list of 4 numbers [x, y, w, h]")
  return data


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

class _Skip(Exception):
  """An image that cannot be used: ``key`` is the count key, message the detail."""

  def __init__(self, key: str, message: str):
    super().__init__(message)
    self.key = key


@dataclasses.dataclass
class NormalisedImage:
  """Result of :func:`normalise_image`.

  Attributes:
    data: encoded 8-bit RGB JPEG or PNG bytes to store.
    width, height: size of the stored image (px).
    raw_size: ``(w, h)`` of the file's pixels before EXIF orientation.
    upright_size: ``(w, h)`` after orientation, before any downscale.
    orientation: EXIF orientation tag applied (1 = none).
    scale: ``(sx, sy)`` downscale factors (1.0 when not downscaled).
    events: count keys that apply (``image_converted``, ``image_exif_rotated``,
      ``image_downscaled``, ``image_reencoded``).
    source_mode: PIL mode of the file (e.g. ``'L'``, ``'CMYK'``, ``'I;16'``).
  """
  data: bytes
  width: int
  height: int
  raw_size: tuple[int, int]
  upright_size: tuple[int, int]
  orientation: int
  scale: tuple[float, float]
  events: list[str]
  source_mode: str


def _png_is_8bit_rgb(data: bytes) -> bool:
  # IHDR: 8-byte signature, length, 'IHDR', width, height, bit depth (byte 24), colour type (25).
  return len(data) > 26 and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 2


def _to_rgb8(im: Image.Image) -> Image.Image:
  """Convert any PIL mode to 8-bit RGB (16/32-bit integer scaled to 8 bits)."""
  mode = im.mode
  if mode == "RGB":
    return im
  if mode.startswith("I"):
    arr = np.asarray(im).astype(np.float64)
    if mode.startswith("I;16") or arr.max(initial=0) > 255:
      arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
  if mode == "F":
    arr = np.asarray(im).astype(np.float64)
    if np.nanmax(arr, initial=0) <= 1.0:
      arr = arr * 255.0
    arr = np.nan_to_num(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
  # L, LA, P, PA, 1, RGBA, CMYK, YCbCr, LAB, HSV...: PIL's conversion; alpha is dropped.
  return im.convert("RGB")


def normalise_image(data: bytes, name: str, max_image_side: Optional[int]) -> NormalisedImage:
  """Decode, validate and normalise one encoded image.

  Args:
    data: the file's bytes.
    name: file name used in messages.
    max_image_side: downscale when the longer side exceeds this (px); ``None``
      or ``0`` disables.

  Returns:
    :class:`NormalisedImage`.

  Raises:
    _Skip: with key ``image_empty``, ``image_unreadable`` or ``image_too_small``.
  """
  if len(data) == 0:
    raise _Skip("image_empty", f"{name}: zero-byte file")
  try:
    im = Image.open(io.BytesIO(data))
    fmt = im.format
    im.load()  # raises on truncated / corrupt data (LOAD_TRUNCATED_IMAGES is not set here)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
    raise _Skip("image_unreadable", f"{name}: unreadable image ({type(e).__name__}: {e})") from None
  source_mode = im.mode
  raw_size = im.size
  events = []
  try:
    orientation = int(im.getexif().get(0x0112, 1) or 1)
  except Exception:
    orientation = 1
  if orientation in range(2, 9):
    im = ImageOps.exif_transpose(im)
    events.append("image_exif_rotated")
  else:
    orientation = 1
  upright = im.size
  if min(upright) < MIN_IMAGE_SIDE:
    raise _Skip("image_too_small", f"{name}: unusable size {upright[0]}x{upright[1]}")
  need_encode = bool(events)
  if source_mode != "RGB" or (fmt == "PNG" and not _png_is_8bit_rgb(data)):
    im = _to_rgb8(im)
    events.append("image_converted")
    need_encode = True
  if fmt not in ("JPEG", "MPO", "PNG"):
    need_encode = True
  scale = (1.0, 1.0)
  if max_image_side and max(upright) > max_image_side:
    s = max_image_side / max(upright)
    new = (max(1, round(upright[0] * s)), max(1, round(upright[1] * s)))
    im = im.resize(new, Image.BILINEAR, reducing_gap=3.0)
    scale = (new[0] / upright[0], new[1] / upright[1])
    events.append("image_downscaled")
    need_encode = True
  if need_encode:
    buf = io.BytesIO()
    if fmt in ("JPEG", "MPO"):
      im.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
      im.save(buf, "PNG")
    data = buf.getvalue()
    events.append("image_reencoded")
  return NormalisedImage(data=data, width=im.size[0], height=im.size[1], raw_size=raw_size,
                         upright_size=upright, orientation=orientation, scale=scale,
                         events=events, source_mode=source_mode)


def _exif_boxes(xyxy: np.ndarray, orientation: int, raw_w: float, raw_h: float) -> np.ndarray:
  """Map ``(N, 4)`` xyxy boxes from raw-pixel to upright coordinates (EXIF 1..8)."""
  x1, y1, x2, y2 = xyxy.T
  W, H = raw_w, raw_h
  if orientation == 2:
    out = (W - x2, y1, W - x1, y2)
  elif orientation == 3:
    out = (W - x2, H - y2, W - x1, H - y1)
  elif orientation == 4:
    out = (x1, H - y2, x2, H - y1)
  elif orientation == 5:  # transpose
    out = (y1, x1, y2, x2)
  elif orientation == 6:  # displayed rotated 90 deg clockwise
    out = (H - y2, x1, H - y1, x2)
  elif orientation == 7:  # transverse
    out = (H - y2, W - x2, H - y1, W - x1)
  elif orientation == 8:  # displayed rotated 90 deg counter-clockwise
    out = (y1, W - x2, y2, W - x1)
  else:
    return xyxy
  return np.stack(out, axis=1).astype(xyxy.dtype)


# ---------------------------------------------------------------------------
# the validation pass
# ---------------------------------------------------------------------------

class _Counter:
  """Counts plus rate-limited warnings naming files / ids."""

  def __init__(self):
    self.counts = collections.Counter({k: 0 for k in COUNT_KEYS})
    self.logged = collections.Counter()
    self.skipped: list[dict] = []
    self.converted_modes = collections.Counter()
    self.boxes_per_image = collections.Counter()  # non-crowd boxes kept -> images

  def add(self, key: str, n: int = 1, message: Optional[str] = None):
    self.counts[key] += n
    if message is not None:
      self.logged[key] += 1
      if self.logged[key] <= MAX_LOG_LINES:
        logger.warning("[coco_folder] %s: %s", key, message)
      elif self.logged[key] == MAX_LOG_LINES + 1:
        logger.warning("[coco_folder] %s: further messages suppressed (see %s)", key, REPORT_FILE)


@dataclasses.dataclass
class _Validated:
  """Everything the validation pass needs besides the images."""
  categories: list[dict]
  cat_index: dict[int, int]
  images: list[dict]
  anns_by_image: dict[int, list[dict]]
  new_ids: dict[int, int]  # id(annotation dict) -> fresh id for duplicate annotation ids


def _index_annotations(data: dict, json_path: Path, counter: _Counter) -> _Validated:
  categories = sorted(data["categories"], key=lambda c: c["id"])
  cat_index = {c["id"]: i for i, c in enumerate(categories)}
  image_ids = {im["id"] for im in data["images"]}
  anns_by_image = collections.defaultdict(list)
  seen_ids = set()
  next_id = max((a["id"] for a in data.get("annotations", [])), default=0) + 1
  new_ids = {}
  for a in data.get("annotations", []):
    if a["id"] in seen_ids:
      counter.add("ann_duplicate_id", message=f"{json_path}: duplicate annotation id {a['id']}; "
                  f"both kept, the later one gets id {next_id} in {GT_FILE}")
      new_ids[id(a)] = next_id
      next_id += 1
    seen_ids.add(a["id"])
    if a["image_id"] not in image_ids:
      counter.add("ann_unknown_image", message=f"{json_path}: annotation {a['id']} refers to "
                  f"unknown image id {a['image_id']}; dropped")
      continue
    anns_by_image[a["image_id"]].append(a)
  return _Validated(categories=categories, cat_index=cat_index, images=list(data["images"]),
                    anns_by_image=anns_by_image, new_ids=new_ids)


def _clean_boxes(anns: list[dict], v: _Validated, img: NormalisedImage, json_wh, name: str,
                 counter: _Counter, warned_cats: set):
  """Validate one image's annotations; returns (xyxy (N,4), classes, crowd, kept anns)."""
  W0, H0 = img.upright_size
  rows, kept = [], []
  for a in anns:
    if a["category_id"] not in v.cat_index:
      msg = None
      if a["category_id"] not in warned_cats:
        warned_cats.add(a["category_id"])
        msg = f"unknown category id {a['category_id']} (annotation {a['id']}, {name}); dropped"
      counter.add("box_unknown_category", message=msg)
      continue
    x, y, w, h = (float(t) for t in a["bbox"])
    if not all(math.isfinite(t) and abs(t) <= ABSURD_COORD for t in (x, y, w, h)):
      counter.add("box_absurd", message=f"annotation {a['id']} ({name}) bbox {a['bbox']}; dropped")
      continue
    if w <= 0 or h <= 0:
      counter.add("box_nonpositive")
      continue
    rows.append((x, y, x + w, y + h))
    kept.append(a)
  xyxy = np.asarray(rows, np.float64).reshape(-1, 4)
  raw_w, raw_h = img.raw_size
  if (img.orientation >= 5 and (json_wh[0], json_wh[1]) == (raw_w, raw_h)
      and (raw_w, raw_h) != (W0, H0)):
    xyxy = _exif_boxes(xyxy, img.orientation, raw_w, raw_h)
  clipped = xyxy.copy()
  clipped[:, 0::2] = np.clip(xyxy[:, 0::2], 0, W0)
  clipped[:, 1::2] = np.clip(xyxy[:, 1::2], 0, H0)
  inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  changed = np.abs(clipped - xyxy).max(axis=1, initial=0) > CLIP_TOLERANCE
  counter.add("box_outside", int((~inside).sum()))
  counter.add("box_clipped", int((inside & changed).sum()))
  sx, sy = img.scale
  clipped = clipped[inside] * np.array([sx, sy, sx, sy])
  kept = [a for a, k in zip(kept, inside) if k]
  classes = np.array([v.cat_index[a["category_id"]] for a in kept], np.int32)
  crowd = np.array([bool(a.get("iscrowd", 0)) for a in kept], bool)
  return clipped.astype(np.float32), classes, crowd, kept


def _iter_split(root: Path, split: str, json_path: Path, data: dict, max_image_side, counter,
                gt_images, gt_anns, progress_every: int, progress: bool) -> Iterator[tuple]:
  """Yield ``(key, record)`` for each usable image, filling counts and the cleaned GT."""
  v = _index_annotations(data, json_path, counter)
  counter.counts["images_in_json"] = len(v.images)
  counter.counts["annotations_in_json"] = len(data.get("annotations", []))
  warned_cats: set = set()
  images = image_folder(root, split)
  t0 = last = time.time()
  n = len(v.images)
  for i, im_info in enumerate(v.images):
    if progress and (i and (i % progress_every == 0 or time.time() - last > 30)):
      last = time.time()
      rate = i / max(last - t0, 1e-9)
      print(f"[coco_folder] {split}: {i}/{n} images ({100 * i / n:.1f}%), {rate:.0f} img/s, "
            f"kept {counter.counts['images_kept']}", flush=True)
    path = images / im_info["file_name"]
    name = str(path)
    try:
      try:
        data_bytes = path.read_bytes()
      except FileNotFoundError:
        raise _Skip("image_missing", f"{name}: listed in {json_path.name} but missing") from None
      except OSError as e:
        raise _Skip("image_unreadable", f"{name}: cannot read ({e})") from None
      img = normalise_image(data_bytes, name, max_image_side)
    except _Skip as s:
      counter.add(s.key, message=str(s))
      counter.skipped.append({"file": name, "image_id": im_info["id"], "reason": s.key,
                              "detail": str(s)})
      continue
    for e in img.events:
      counter.add(e)
    if "image_converted" in img.events:
      counter.converted_modes[img.source_mode] += 1
    json_wh = (im_info["width"], im_info["height"])
    if json_wh != img.upright_size:
      if img.orientation >= 5 and json_wh == img.raw_size:
        counter.add("image_exif_boxes_rotated", message=f"{name}: json size {json_wh} is the "
                    f"pre-EXIF size; boxes rotated with the image (orientation {img.orientation})")
      else:
        counter.add("image_size_mismatch", message=f"{name}: json size {json_wh[0]}x{json_wh[1]} "
                    f"!= file {img.upright_size[0]}x{img.upright_size[1]}; using the file's size")
    anns = v.anns_by_image.get(im_info["id"], [])
    boxes, classes, crowd, kept = _clean_boxes(anns, v, img, json_wh, name, counter, warned_cats)
    if not anns:
      counter.add("image_no_annotations")
    elif not kept:
      counter.add("image_all_boxes_dropped")
    counter.counts["images_kept"] += 1
    counter.counts["boxes_kept"] += len(kept)
    counter.boxes_per_image[int(len(kept) - crowd.sum())] += 1
    counter.counts["crowd_boxes_kept"] += int(crowd.sum())
    gt_images.append({"id": im_info["id"], "file_name": im_info["file_name"],
                      "width": img.width, "height": img.height})
    sx, sy = img.scale
    for a, b in zip(kept, boxes):
      area = a.get("area")
      area = float(area) if _is_number(area) and math.isfinite(area) and area > 0 else None
      area = (area * sx * sy) if area is not None else float((b[2] - b[0]) * (b[3] - b[1]))
      gt_anns.append({"id": v.new_ids.get(id(a), a["id"]), "image_id": im_info["id"],
                      "category_id": a["category_id"],
                      "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                      "area": area, "iscrowd": int(bool(a.get("iscrowd", 0)))})
    yield i, {"image": img.data, "image_id": im_info["id"], "height": img.height,
              "width": img.width, "boxes": boxes, "classes": classes, "is_crowd": crowd,
              "file_name": im_info["file_name"]}


# ---------------------------------------------------------------------------
# TFDS builder
# ---------------------------------------------------------------------------

def _builder_class():
  """The TFDS builder class (built lazily so importing this module does not import TFDS)."""
  global _BUILDER_CLS
  if _BUILDER_CLS is not None:
    return _BUILDER_CLS

  class CocoFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One split of a COCO-layout folder (see the module docstring)."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(PREP_VERSION)
    # No code-side metadata (checksums, etc.). Also avoids TFDS's package-resource lookup,
    # which needs the optional `importlib_resources` module.
    code_path = None

    def __init__(self, *, root, split, json_path, max_image_side, progress_every, progress,
                 **kwargs):
      self._root, self._split = Path(root), split
      self._json_path = Path(json_path)
      self._max_side = max_image_side
      self._progress_every, self._progress = progress_every, progress
      self.report = None
      self._data = None
      super().__init__(**kwargs)

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    # prepared to ..." (nothing is downloaded); our own lines say where and how it went.
    def _log_download_bytes(self) -> None:
      pass

    def _log_download_done(self) -> None:
      pass

    def _info(self):
      f = tfds.features
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"COCO-layout folder {self._root} split {self._split} (asff_jax).",
          features=f.FeaturesDict({
              "image": f.Tensor(shape=(), dtype=np.object_),
              "image_id": np.int64,
              "height": np.int32,
              "width": np.int32,
              "boxes": f.Tensor(shape=(None, 4), dtype=np.float32),
              "classes": f.Tensor(shape=(None,), dtype=np.int32),
              "is_crowd": f.Tensor(shape=(None,), dtype=np.bool_),
              "file_name": f.Text(),
          }),
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      return {_split_key(self._split): self._generate_examples()}

    def _generate_examples(self):
      data = self._data if self._data is not None else load_annotations(self._json_path)
      self._data = None
      self._counter = _Counter()
      self._gt_images, self._gt_anns = [], []
      self._categories = sorted(data["categories"], key=lambda c: c["id"])
      self._info_keys = {k: None for k in data}
      yield from _iter_split(self._root, self._split, self._json_path, data, self._max_side,
                             self._counter, self._gt_images, self._gt_anns,
                             self._progress_every, self._progress)

    def _download_and_prepare(self, dl_manager, download_config):
      super()._download_and_prepare(dl_manager, download_config)
      # self.data_dir is TFDS's temporary directory here: renamed into place on success.
      out = Path(self.data_dir)
      cats = [{k: c[k] for k in ("id", "name", "supercategory") if k in c}
              for c in self._categories]
      with open(out / GT_FILE, "w") as f:
        json.dump({"info": {"description": f"cleaned by asff_jax from {self._json_path}"},
                   "images": self._gt_images, "annotations": self._gt_anns,
                   "categories": cats}, f)
      self.report = {
          "root": str(self._root), "split": self._split, "json": str(self._json_path),
          "max_image_side": self._max_side, "prep_version": PREP_VERSION,
          "counts": dict(self._counter.counts),
          "converted_modes": dict(self._counter.converted_modes),
          "skipped_images": self._counter.skipped, "categories": cats,
          "images_only": is_images_only(self._info_keys),
          "boxes_per_image": {str(k): v for k, v in sorted(self._counter.boxes_per_image.items())},
      }
      with open(out / REPORT_FILE, "w") as f:
        json.dump(self.report, f, indent=1)

  _BUILDER_CLS = CocoFolderBuilder
  return _BUILDER_CLS


_BUILDER_CLS = None


def _split_key(split: str) -> str:
  key = "".join(ch if ch.isalnum() else "_" for ch in split).lower()
  return key if key and key[0].isalpha() else f"s_{key}"


def _quiet_absl(fn, *args, **kwargs):
  """Call ``fn`` with absl's "Using custom data configuration" warning silenced."""
  absl_logger = logging.getLogger("absl")
  old_level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    return fn(*args, **kwargs)
  finally:
    absl_logger.setLevel(old_level)


@dataclasses.dataclass
class PreparedSplit:
  """A prepared split: TFDS split name ``split_key``, its ``version_dir``, the
  cleaned ground truth ``gt_path`` and the ``report`` dict (``counts``,
  ``categories``, ``skipped_images``, ...)."""
  split_key: str
  version_dir: Path
  gt_path: Path
  report: dict

  @property
  def counts(self) -> dict:
    return self.report["counts"]

  def data_source(self):
    """Random-access TFDS ``ArrayRecordDataSource`` over the records (picklable)."""
    builder = tfds.builder_from_directory(os.fspath(self.version_dir))
    return builder.as_data_source(split=self.split_key)


_FINGERPRINTS: dict = {}  # (json path, size, mtime_ns) -> sha256 state after the bytes: hashed once per process


def _json_digest(json_path: Path):
  try:
    st = os.stat(json_path)
  except FileNotFoundError:
    raise CocoFormatError(f"{json_path}: annotation json not found "
                          f"(expected ROOT/annotations/instances_<split>.json)") from None
  key = (os.fspath(json_path), st.st_size, st.st_mtime_ns)
  if key not in _FINGERPRINTS:
    h = hashlib.sha256()
    with open(json_path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    _FINGERPRINTS[key] = h
  return _FINGERPRINTS[key].copy()


def _fingerprint(root: Path, split: str, json_path: Path, max_image_side) -> str:
  h = _json_digest(json_path)  # the same digest as hashing the bytes here, without re-reading them
  h.update(f"\0{root}\0{split}\0{PREP_VERSION}\0{max_image_side}".encode())
  return h.hexdigest()[:16]


def boxes_per_image(report: dict) -> Optional[np.ndarray]:
  """``counts[n]`` = images with ``n`` non-crowd boxes kept, from a preparation report (None if absent)."""
  hist = report.get("boxes_per_image")
  if hist is None:
    return None
  n = max((int(k) for k in hist), default=0)
  counts = np.zeros(n + 1, np.int64)
  for k, v in hist.items():
    counts[int(k)] = int(v)
  return counts


def crowding(counts: np.ndarray, max_boxes: int) -> dict:
  """What a per-image cap of ``max_boxes`` drops, given :func:`boxes_per_image` counts.

  Returns ``{'images', 'boxes_dropped', 'largest', 'median', 'p99'}``:
  images above the cap, boxes beyond it, the largest count, the median and
  99th percentile of boxes per image.
  """
  n = np.arange(len(counts))
  over = n > max_boxes
  cum = np.cumsum(counts)
  total = int(cum[-1]) if len(cum) else 0
  pct = lambda q: int(np.searchsorted(cum, q * total)) if total else 0
  return {"images": int(counts[over].sum()), "boxes_dropped": int(((n - max_boxes) * counts)[over].sum()),
          "largest": int(n[counts > 0].max()) if total else 0, "median": pct(0.5), "p99": pct(0.99)}


def format_boxes_per_image(report: dict, max_boxes: int = 50) -> str:
  """One summary line: median / 99th percentile / largest boxes per image and images above ``max_boxes``."""
  counts = boxes_per_image(report)
  if counts is None:
    return ""
  c = crowding(counts, max_boxes)
  return (f"  boxes per image: median {c['median']}, 99th percentile {c['p99']}, largest "
          f"{c['largest']}; {c['images']} images have more than {max_boxes}")


def format_report(counts: dict) -> str:
  """One line per non-zero count (the printed summary)."""
  return "\n".join(f"  {k:28s} {counts[k]}" for k in counts if counts[k])


def prepare_coco_folder(root, split: str, data_dir=None, *,
                        max_image_side: Optional[int] = DEFAULT_MAX_IMAGE_SIDE,
                        progress_every: int = 1000, progress: bool = True) -> PreparedSplit:
  """Validate ``root``'s ``split`` and prepare it as array_record TFDS data (once).

  Args:
    root: COCO-layout folder (``root/annotations/instances_<split>.json``,
      images in ``root/<split>/``).
    split: split name, e.g. ``'train2017'`` or ``'val'``.
    data_dir: TFDS data dir for the prepared data (``None``: TFDS's default,
      ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    max_image_side: downscale images whose longer side exceeds this (px);
      ``None``/``0`` keeps every size. Part of the prepared data's identity.
    progress_every: print a progress line every this many images.
    progress: print progress and the summary.

  Returns:
    :class:`PreparedSplit` (re-used without any work when already prepared).

  Raises:
    CocoFormatError: malformed json / missing keys / duplicate image or
      category ids (nothing is written).
  """

  root = Path(root).expanduser().absolute()
  json_path = annotation_path(root, split)
  digest = _fingerprint(root, split, json_path, max_image_side or 0)
  key = _split_key(split)
  config = tfds.core.BuilderConfig(name=f"{key}_{digest}",
                                   description=f"{root} [{split}] sha256 {digest}")
  if data_dir is not None:
    data_dir = os.fspath(Path(data_dir).expanduser().absolute())
  cls = _builder_class()
  kwargs = dict(root=root, split=split, json_path=json_path, max_image_side=max_image_side or 0,
                progress_every=max(1, progress_every), progress=progress)
  builder = _quiet_absl(cls, config=config, data_dir=data_dir, **kwargs)
  version_dir = Path(builder.data_dir)
  if (version_dir / REPORT_FILE).exists():
    with open(version_dir / REPORT_FILE) as f:
      report = json.load(f)
    if progress:
      c = report["counts"]
      print(f"[coco_folder] reusing {version_dir} ({c['images_kept']} images, "
            f"{c['boxes_kept']} boxes)", flush=True)
    return PreparedSplit(key, version_dir, version_dir / GT_FILE, report)
  builder._data = load_annotations(json_path)  # fail fast, before TFDS creates any directory
  if progress:
    print(f"[coco_folder] preparing {root} [{split}] -> {version_dir}", flush=True)
  t0 = time.time()
  builder.download_and_prepare(file_format="array_record")
  report = builder.report
  if progress:
    print(f"[coco_folder] {split}: prepared in {time.time() - t0:.1f} s; summary:\n"
          f"{format_report(report['counts'])}\n{format_boxes_per_image(report)}", flush=True)
  return PreparedSplit(key, version_dir, version_dir / GT_FILE, report)


def main(argv=None) -> int:
  """``python -m asff_jax.data.coco_folder --root ROOT --split S [--split S2] [--data_dir D]``."""
  from absl import flags  # pylint: disable=import-outside-toplevel  (command line only)
  from asff_jax import cli  # pylint: disable=import-outside-toplevel  (cli sits above data/)

  def define(fv, _argv):
    flags.DEFINE_string("root", None, "COCO-layout folder", flag_values=fv)
    flags.DEFINE_multi_string("split", None, "split to prepare (repeat for several)", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir for the prepared data", flag_values=fv)
    flags.DEFINE_integer("max_image_side", DEFAULT_MAX_IMAGE_SIDE, "downscale larger images", flag_values=fv)
    flags.mark_flags_as_required(["root", "split"], flag_values=fv)

  def run(f):
    for split in f.split:
      prepared = prepare_coco_folder(f.root, split, f.data_dir, max_image_side=f.max_image_side)
      print(f"{split}: {prepared.version_dir}")

  return cli.run(run, "asff_jax.data.coco_folder", argv, define)


if __name__ == "__main__":
  sys.exit(main())
