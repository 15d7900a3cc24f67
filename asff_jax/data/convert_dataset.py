"""Pascal VOC XML and YOLO txt datasets → the COCO-format folder the rest of the project reads.

::

    python -m asff_jax.data.convert_dataset --from voc --src VOCdevkit/VOC2007 --out COCO_DIR
    python -m asff_jax.data.convert_dataset --from yolo --src my_yolo_dataset --out COCO_DIR

writes ``COCO_DIR/annotations/instances_<split>.json`` and ``COCO_DIR/<split>/``
(symbolic links to the source images; ``--copy`` copies them) for every split
found, plus ``COCO_DIR/convert_report.json`` with the counts below, and prints
the command that trains on it (``dataset.source=coco_folder``). Preparation
(:mod:`asff_jax.data.coco_folder`) then checks the images themselves and prints
its own summary, as for any COCO folder.

Layouts
-------
``voc`` (Pascal VOC, as the devkit ships it)::

    SRC/Annotations/<id>.xml   SRC/JPEGImages/<file>   SRC/ImageSets/Main/<split>.txt

Splits are the ``ImageSets/Main/<split>.txt`` files among ``train``, ``val``,
``trainval`` and ``test`` (or ``--splits``); without ``ImageSets`` every XML
is one split ``train``. Classes are the sorted object names of all splits (or
``--classes a,b,c`` in that order), category ids 1..K. Boxes: VOC's
``xmin, ymin, xmax, ymax`` are 1-based inclusive pixel indices, so COCO's
``[x, y, w, h] = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``
(the convention of the VOC devkit and mmdetection). ``difficult=1`` objects
become ``iscrowd=1``: ignore regions in evaluation, as VOC's own evaluation
treats them; training uses them unless ``--config.dataset.use_crowd=False``.

``yolo`` (ultralytics)::

    SRC/<data>.yaml            names (list or {id: name}); train / val / test:
                               image folders or .txt lists, relative to `path`
    SRC/images/<split>/<file>  SRC/labels/<split>/<stem>.txt

A label line is ``class cx cy w h`` normalised to the image (a polygon line
``class x1 y1 x2 y2 ...`` becomes its bounding box); the label file of an
image is its path with the last ``images`` directory replaced by ``labels``
and the suffix by ``.txt`` (the ultralytics rule). Without a yaml, the splits
are the folders under ``SRC/images`` and the names come from
``SRC/classes.txt`` (one per line) or ``--classes``. Category ids are the YOLO
class indices (0..K-1), names as given. Image sizes are read from the files.

Bad data (counted in the printed summary and ``convert_report.json``, or a
one-line error naming the file):

==========================================  ===============================  ======================
problem                                     action                           count key
==========================================  ===============================  ======================
source folder / yaml / split list missing   FATAL (names the path)           —
no class names (YOLO without yaml/classes)  FATAL                            —
XML unreadable                              skip the image                   ``xml_malformed``
image file missing or unreadable            skip the image                   ``image_missing``
image without a label file (YOLO)           keep, no boxes (background)      ``image_no_labels``
malformed label line / XML object           drop the box                     ``box_malformed``
class index / name not in the classes       drop the box                     ``box_unknown_class``
zero or negative width / height             drop the box                     ``box_nonpositive``
polygon label line                          its bounding box                 ``box_from_polygon``
``difficult=1`` (VOC)                       ``iscrowd=1``                    ``box_difficult``
==========================================  ===============================  ======================
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from asff_jax.errors import DataError, MissingFileError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VOC_SPLITS = ("train", "val", "trainval", "test")
REPORT_FILE = "convert_report.json"

__all__ = ["convert_voc", "convert_yolo", "IMAGE_EXTENSIONS"]


class _Split:
  """One split being built: COCO ``images`` / ``annotations`` lists and the source image per file name."""

  def __init__(self, name: str):
    self.name = name
    self.images: list[dict] = []
    self.annotations: list[dict] = []
    self.files: dict[str, Path] = {}  # file_name in the COCO folder -> source image

  def add_image(self, src: Path, file_name: str, width: int, height: int) -> int:
    image_id = len(self.images) + 1
    self.images.append({"id": image_id, "file_name": file_name, "width": int(width),
                        "height": int(height)})
    self.files[file_name] = src
    return image_id

  def add_box(self, image_id: int, category_id: int, xywh, crowd: bool = False):
    x, y, w, h = (float(v) for v in xywh)
    self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                             "category_id": int(category_id), "bbox": [x, y, w, h], "area": w * h,
                             "iscrowd": int(crowd)})


def _write(out: Path, splits: Sequence[_Split], categories: list[dict], counts: Counter, *,
           copy: bool, source: str, fmt: str) -> dict:
  """Writes the COCO folder (json per split, images linked or copied) and the report."""
  (out / "annotations").mkdir(parents=True, exist_ok=True)
  for s in splits:
    folder = out / s.name
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, src in s.files.items():
      dst = folder / file_name
      dst.parent.mkdir(parents=True, exist_ok=True)
      if dst.is_symlink() or dst.exists():
        dst.unlink()
      if copy:
        shutil.copyfile(src, dst)
      else:
        os.symlink(os.path.abspath(src), dst)
    data = {"images": s.images, "annotations": s.annotations, "categories": categories,
            "info": {"description": f"converted from {fmt} {source} by asff_jax.data.convert_dataset"}}
    tmp = out / "annotations" / f".instances_{s.name}.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, out / "annotations" / f"instances_{s.name}.json")
  report = {"from": fmt, "source": source,
            "splits": {s.name: {"images": len(s.images), "boxes": len(s.annotations)} for s in splits},
            "categories": categories, "counts": dict(counts)}
  (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
  return report


def _image_size(path: Path, counts: Counter) -> Optional[tuple[int, int]]:
  """``(width, height)`` from the file header, or None (counted) when missing or unreadable."""
  try:
    with Image.open(path) as im:
      return im.size
  except (OSError, ValueError, Image.DecompressionBombError):
    counts["image_missing"] += 1
    return None


# ---------------------------------------------------------------------------- VOC


def _voc_objects(xml_path: Path):
  """``(filename, (w, h) or None, [(name, difficult, (xmin, ymin, xmax, ymax) or None)])``.

  Raises:
    ET.ParseError, OSError: an unreadable XML.
  """
  root = ET.parse(xml_path).getroot()
  filename = (root.findtext("filename") or "").strip()
  size = root.find("size")
  wh = None
  if size is not None:
    try:
      wh = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    except (TypeError, ValueError):
      wh = None
  objects = []
  for obj in root.iter("object"):
    name = (obj.findtext("name") or "").strip()
    difficult = (obj.findtext("difficult") or "0").strip() == "1"
    bb = obj.find("bndbox")
    try:
      box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (AttributeError, TypeError, ValueError):
      box = None
    objects.append((name, difficult, box))
  return filename, wh, objects


def convert_voc(src, out, *, splits: Optional[Sequence[str]] = None,
                classes: Optional[Sequence[str]] = None, copy: bool = False) -> dict:
  """Pascal VOC (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``) → COCO folder ``out``.

  Args:
    src: the VOC year folder (e.g. ``VOCdevkit/VOC2007``).
    out: the COCO-format folder to write.
    splits: split names (``ImageSets/Main/<split>.txt``); None: those of
      ``train``, ``val``, ``trainval``, ``test`` that exist, or ``train`` = every
      XML when there is no ``ImageSets/Main``.
    classes: class names in id order (ids 1..K); None: the sorted names found.
    copy: copy the images instead of linking them.

  Returns:
    the report (``splits`` with image/box counts, ``categories``, ``counts``).

  Raises:
    MissingFileError: ``src``, ``Annotations/`` or a requested split list is missing.
    DataError: no XML at all.
  """
  src, out = Path(src), Path(out)
  ann_dir, img_dir = src / "Annotations", src / "JPEGImages"
  if not ann_dir.is_dir():
    raise MissingFileError(f"{ann_dir}: not found (expected a VOC folder with Annotations/, "
                           "JPEGImages/ and ImageSets/Main/)")
  sets = src / "ImageSets" / "Main"
  if splits:
    lists = {s: sets / f"{s}.txt" for s in splits}
    for s, p in lists.items():
      if not p.exists():
        raise MissingFileError(f"{p}: not found (split '{s}')")
    ids = {s: p.read_text().split() for s, p in lists.items()}
  elif sets.is_dir() and any((sets / f"{s}.txt").exists() for s in VOC_SPLITS):
    ids = {s: (sets / f"{s}.txt").read_text().split() for s in VOC_SPLITS if (sets / f"{s}.txt").exists()}
  else:
    ids = {"train": sorted(p.stem for p in ann_dir.glob("*.xml"))}
  if not any(ids.values()):
    raise DataError(f"{ann_dir}: no annotation XML files")

  counts: Counter = Counter()
  parsed: dict[str, list] = {}
  for split, stems in ids.items():
    rows = []
    for stem in stems:
      xml_path = ann_dir / f"{stem}.xml"
      try:
        rows.append((stem, *_voc_objects(xml_path)))
      except (ET.ParseError, OSError):
        counts["xml_malformed"] += 1
    parsed[split] = rows
  names = list(classes) if classes else sorted({o[0] for rows in parsed.values() for r in rows
                                                for o in r[3] if o[0]})
  cat_of = {n: i + 1 for i, n in enumerate(names)}
  out_splits = []
  for split, rows in parsed.items():
    s = _Split(split)
    for stem, filename, wh, objects in rows:
      image = img_dir / (filename or f"{stem}.jpg")
      if not image.exists():
        alt = [img_dir / f"{stem}{e}" for e in IMAGE_EXTENSIONS if (img_dir / f"{stem}{e}").exists()]
        image = alt[0] if alt else image
      real = _image_size(image, counts)
      if real is None:
        continue
      image_id = s.add_image(image, image.name, *real)
      for name, difficult, box in objects:
        if box is None:
          counts["box_malformed"] += 1
          continue
        if name not in cat_of:
          counts["box_unknown_class"] += 1
          continue
        x1, y1, x2, y2 = box
        w, h = x2 - x1 + 1, y2 - y1 + 1
        if w <= 0 or h <= 0:
          counts["box_nonpositive"] += 1
          continue
        counts["box_difficult"] += int(difficult)
        s.add_box(image_id, cat_of[name], (x1 - 1, y1 - 1, w, h), crowd=difficult)
    out_splits.append(s)
  categories = [{"id": cat_of[n], "name": n} for n in names]
  return _write(out, out_splits, categories, counts, copy=copy, source=str(src), fmt="voc")


# ---------------------------------------------------------------------------- YOLO


def _yolo_names(value) -> list[str]:
  if isinstance(value, dict):
    return [str(value[k]) for k in sorted(value, key=int)]
  return [str(v) for v in value]


def _label_path(image: Path) -> Path:
  """The ultralytics rule: the last ``images`` directory → ``labels``, suffix → ``.txt``."""
  parts = list(image.parts)
  for i in range(len(parts) - 2, -1, -1):
    if parts[i] == "images":
      parts[i] = "labels"
      break
  return Path(*parts).with_suffix(".txt")


def _list_images(entry: Path) -> list[Path]:
  if entry.is_dir():
    return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
  if entry.suffix == ".txt" and entry.exists():
    base = entry.parent
    return [(base / line.strip()).resolve() if not os.path.isabs(line.strip()) else Path(line.strip())
            for line in entry.read_text().splitlines() if line.strip()]
  raise MissingFileError(f"{entry}: not found (a folder of images or a .txt list of image paths)")


def _yolo_layout(src: Path, classes):
  """``(names, {split: [image paths]})`` from the yaml, or from ``images/<split>`` folders."""
  yamls = sorted(p for p in src.glob("*.yaml") if p.is_file()) + sorted(src.glob("*.yml"))
  if yamls:
    import yaml  # pylint: disable=import-outside-toplevel  (only YOLO datasets need it)
    try:
      spec = yaml.safe_load(yamls[0].read_text())
    except yaml.YAMLError as e:
      raise DataError(f"{yamls[0]}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
      raise DataError(f"{yamls[0]}: expected a mapping with 'names' and the split entries")
    base = Path(spec.get("path") or src)
    base = base if base.is_absolute() else (src / base)
    names = list(classes) if classes else _yolo_names(spec.get("names") or [])
    if not names:
      raise DataError(f"{yamls[0]}: no 'names' (the class names)")
    lists = {}
    for split in ("train", "val", "test"):
      entries = spec.get(split)
      if not entries:
        continue
      entries = entries if isinstance(entries, list) else [entries]
      lists[split] = [im for e in entries for im in _list_images(
          Path(e) if os.path.isabs(str(e)) else base / str(e))]
    return names, lists
  images = src / "images"
  if not images.is_dir():
    raise MissingFileError(f"{src}: no *.yaml and no images/ folder (expected the ultralytics layout)")
  names = list(classes or [])
  if not names and (src / "classes.txt").exists():
    names = [line.strip() for line in (src / "classes.txt").read_text().splitlines() if line.strip()]
  if not names:
    raise DataError(f"{src}: no class names (give a data.yaml with 'names', classes.txt or --classes)")
  splits = sorted(p for p in images.iterdir() if p.is_dir())
  lists = {p.name: _list_images(p) for p in splits} if splits else {"train": _list_images(images)}
  return names, lists


def convert_yolo(src, out, *, classes: Optional[Sequence[str]] = None, copy: bool = False) -> dict:
  """An ultralytics-layout YOLO dataset → COCO folder ``out`` (layout in the module docstring).

  Args:
    src: the dataset folder (with ``data.yaml``, or ``images/<split>`` and ``labels/<split>``).
    out: the COCO-format folder to write.
    classes: class names in index order (overrides the yaml's ``names``).
    copy: copy the images instead of linking them.

  Returns:
    the report (``splits`` with image/box counts, ``categories``, ``counts``).

  Raises:
    MissingFileError, DataError: see the module docstring's table.
  """
  src, out = Path(src), Path(out)
  if not src.is_dir():
    raise MissingFileError(f"{src}: not found")
  names, lists = _yolo_layout(src, classes)
  counts: Counter = Counter()
  out_splits = []
  for split, images in lists.items():
    s = _Split(split)
    root = os.path.commonpath([str(p.parent) for p in images]) if images else ""
    for image in images:
      wh = _image_size(image, counts)
      if wh is None:
        continue
      rel = os.path.relpath(image, root) if root else image.name
      image_id = s.add_image(image, rel, *wh)
      label = _label_path(image)
      if not label.exists():
        counts["image_no_labels"] += 1
        continue
      w, h = wh
      for line in label.read_text().splitlines():
        fields = line.split()
        if not fields:
          continue
        try:
          k, values = int(float(fields[0])), [float(v) for v in fields[1:]]
        except ValueError:
          counts["box_malformed"] += 1
          continue
        if len(values) == 4:
          cx, cy, bw, bh = values
          x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
        elif len(values) >= 6 and len(values) % 2 == 0:
          xs, ys = values[0::2], values[1::2]
          x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
          counts["box_from_polygon"] += 1
        else:
          counts["box_malformed"] += 1
          continue
        if not 0 <= k < len(names):
          counts["box_unknown_class"] += 1
          continue
        if x2 <= x1 or y2 <= y1:
          counts["box_nonpositive"] += 1
          continue
        s.add_box(image_id, k, (x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h))
    out_splits.append(s)
  categories = [{"id": i, "name": n} for i, n in enumerate(names)]
  return _write(out, out_splits, categories, counts, copy=copy, source=str(src), fmt="yolo")


def format_summary(report: dict, out) -> str:
  """The printed summary: per split images/boxes, the problem counts, and the training command."""
  lines = [f"converted {report['from']} {report['source']} -> {out} "
           f"({len(report['categories'])} classes: "
           f"{', '.join(c['name'] for c in report['categories'][:10])}"
           f"{', ...' if len(report['categories']) > 10 else ''})"]
  for split, n in report["splits"].items():
    lines.append(f"  {split:10s} {n['images']} images, {n['boxes']} boxes")
  lines += [f"  {k:28s} {v}" for k, v in sorted(report["counts"].items()) if v]
  splits = list(report["splits"])
  train = "train" if "train" in splits else ("trainval" if "trainval" in splits else splits[0])
  val = next((s for s in ("val", "test") if s in splits and s != train), train)
  lines.append("train on it with:\n  python -m asff_jax.train --config configs/digits_aug.py --workdir DIR "
               f"--config.dataset.source=coco_folder --config.dataset.root={out} "
               f"--config.dataset.train_split={train} --config.dataset.eval_split={val} "
               f"--config.model.num_classes={len(report['categories'])}")
  return "\n".join(lines)


def main(argv=None) -> int:
  """``python -m asff_jax.data.convert_dataset --from voc|yolo --src DIR --out COCO_DIR``."""
  from absl import flags  # pylint: disable=import-outside-toplevel  (command line only)
  from asff_jax import cli  # pylint: disable=import-outside-toplevel  (cli sits above data/)

  def define(fv, _argv):
    flags.DEFINE_enum("from", None, ["voc", "yolo"], "source layout", flag_values=fv)
    flags.DEFINE_string("src", None, "source dataset folder", flag_values=fv)
    flags.DEFINE_string("out", None, "COCO-format folder to write", flag_values=fv)
    flags.DEFINE_list("classes", None, "class names in id order (default: from the dataset)", flag_values=fv)
    flags.DEFINE_list("splits", None, "VOC: ImageSets/Main split names (default: those present)",
                      flag_values=fv)
    flags.DEFINE_bool("copy", False, "copy images instead of linking them", flag_values=fv)
    flags.mark_flags_as_required(["from", "src", "out"], flag_values=fv)

  def run(f):
    fmt = f["from"].value
    if fmt == "voc":
      report = convert_voc(f.src, f.out, splits=f.splits, classes=f.classes, copy=f.copy)
    else:
      if f.splits:
        raise UserError("--splits is for VOC; a YOLO dataset's splits come from its yaml")
      report = convert_yolo(f.src, f.out, classes=f.classes, copy=f.copy)
    print(format_summary(report, f.out))

  return cli.run(run, "asff_jax.data.convert_dataset", argv, define)


if __name__ == "__main__":
  sys.exit(main())
