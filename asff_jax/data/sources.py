"""Random-access dataset sources: ``open_source(config.dataset, split)``.

What
----
One interface over four kinds of data, chosen by ``dataset.source``:

``'coco_folder'``
  Any local folder in COCO's layout (``dataset.root``), validated and prepared
  once into array_record TFDS data under ``dataset.data_dir`` by
  :func:`asff_jax.data.coco_folder.prepare_coco_folder` (bad-data policy and
  on-disk layout are documented there). Split names are the folder's
  (``instances_<split>.json``), e.g. ``'train2017'``/``'val2017'``.
``'coco_tfds'``
  TFDS ``coco/2017`` (``dataset.tfds_name``) already prepared in
  ``dataset.data_dir`` (nothing is downloaded). Random access needs the
  ``array_record`` format; a tfrecord-only preparation raises a
  :class:`~asff_jax.errors.DataError` that prints the one-time in-place conversion command::

    tfds convert_format --dataset_version_dir=DATA_DIR/coco/2017/1.1.0 --out_file_format=array_record

  (TFDS 4.9.10's CLI imports ``apache_beam``: ``pip install apache-beam`` first)
  or, without Beam, :func:`convert_to_array_record`::

    python -m asff_jax.data.sources convert DATA_DIR/coco/2017/1.1.0

  Split ``'val'`` is accepted as an alias of TFDS's ``'validation'``.
``'digits'``
  The built-in offline dataset: :func:`asff_jax.data.make_digits.ensure_digits`
  at ``dataset.root`` (default ``~/.cache/asff_jax/digits``), then exactly the
  ``'coco_folder'`` path. Splits ``'train'``/``'val'``.
``'synthetic'``
  Small in-memory images of coloured rectangles (:mod:`asff_jax.data.synthetic`),
  for tests and benchmarks.

Config keys: the ``dataset`` section of :mod:`asff_jax.config` (``source``,
``root``, ``data_dir``, ``train_split``, ``eval_split``, ``use_crowd``,
``max_image_side``, ``tfds_name``, ``eval_gt_json``, ``digits_*``,
``synthetic_*``).

Record format (``source[i]``)
-----------------------------
A dict of numpy values:

* ``image``: ``bytes`` — encoded JPEG/PNG file bytes. coco_folder/digits:
  8-bit RGB, upright (EXIF already applied; decode the pixels as stored, do
  not apply EXIF again). coco_tfds: the original COCO files as TFDS stored
  them (some are grayscale JPEGs: decode with 3 channels forced).
* ``image_id``: ``int`` original image id.
* ``height``, ``width``: ``int`` size of the stored image (px).
* ``boxes``: float32 ``(N, 4)`` ``[x1, y1, x2, y2]`` in stored-image pixels,
  continuous corners (``x2 = x + w``).
* ``classes``: int32 ``(N,)`` in ``0..C-1`` — index of the category id in
  ``category_ids`` (sorted), the official convention.
* ``is_crowd``: bool ``(N,)``. With ``use_crowd=False`` crowd boxes are removed
  from the records (they stay in ``eval_gt``) — the one place crowd boxes are
  dropped. Images without boxes are returned with ``N = 0`` (background images).

Attributes: ``num_classes``, ``category_ids`` (sorted list), ``class_names``
(in the same order), ``eval_gt`` (coco_folder/digits: path of the cleaned
``gt.json``; coco_tfds: ``eval_gt_json`` if given, otherwise a COCO dict
rebuilt from the split's records on first access — see
:meth:`DatasetSource.eval_gt`), ``name``, ``split``, and ``report``
(coco_folder/digits: the preparation report). Sources are picklable (for
worker processes).

Errors: a user's mistake (unknown source or split, a missing root, an
unprepared TFDS dataset, malformed annotations) raises a subclass of
:class:`asff_jax.errors.UserError` naming the file or key.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.core import file_adapters

from asff_jax import config as config_lib
from asff_jax.data import coco_folder as cf
from asff_jax.data import make_digits, synthetic
from asff_jax.errors import ConfigError, DataError, MissingFileError

__all__ = ["COCO_CATEGORY_IDS", "COCO_CLASS_NAMES", "DatasetSource", "open_source",
           "convert_command", "convert_to_array_record",
           "DEFAULT_DIGITS_DIR", "RECORD_KEYS"]

RECORD_KEYS = ("image", "image_id", "height", "width", "boxes", "classes", "is_crowd")
DEFAULT_DIGITS_DIR = "~/.cache/asff_jax/digits"

# The 80 COCO 2014/2017 detection categories: official ids (sorted) and names.
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
]
COCO_CLASS_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
assert len(COCO_CATEGORY_IDS) == len(COCO_CLASS_NAMES) == 80

class DatasetSource(Sequence):
  """Random-access records in the common format (see the module docstring).

  ``len(source)``, ``source[i]`` (``0 <= i < len``; negative indices allowed)
  and ``source.__getitems__(indices)`` (batched read).
  """

  def __init__(self, data_source, *, kind: str, name: str, split: str, use_crowd: bool,
               category_ids, class_names, eval_gt=None, report: Optional[dict] = None,
               label_to_class: Optional[np.ndarray] = None):
    self._ds = data_source
    self._kind = kind
    self.name, self.split = name, split
    self.use_crowd = bool(use_crowd)
    self.category_ids = [int(c) for c in category_ids]
    self.class_names = list(class_names)
    self.num_classes = len(self.category_ids)
    self.report = report
    self._eval_gt = eval_gt
    self._label_to_class = label_to_class

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} records")
    return self._convert(self._ds[i])

  def __getitems__(self, indices) -> list[dict]:
    idx = [int(i) for i in indices]
    raw = self._ds.__getitems__(idx) if hasattr(self._ds, "__getitems__") else [
        self._ds[i] for i in idx]
    return [self._convert(r) for r in raw]

  def _convert(self, r: dict) -> dict:
    if self._kind == "coco_tfds":
      out = _convert_tfds_coco(r, self._label_to_class)
    else:
      out = {
          "image": bytes(r["image"]),
          "image_id": int(r["image_id"]),
          "height": int(r["height"]),
          "width": int(r["width"]),
          "boxes": np.asarray(r["boxes"], np.float32).reshape(-1, 4),
          "classes": np.asarray(r["classes"], np.int32).reshape(-1),
          "is_crowd": np.asarray(r["is_crowd"], bool).reshape(-1),
      }
    if not self.use_crowd and out["is_crowd"].any():
      keep = ~out["is_crowd"]
      out["boxes"], out["classes"], out["is_crowd"] = (
          out["boxes"][keep], out["classes"][keep], out["is_crowd"][keep])
    return out

  @property
  def eval_gt(self):
    """COCO ground truth for :class:`asff_jax.evaluation.coco_eval.CocoEvaluator`.

    coco_folder / digits: path (str) of the cleaned ``gt.json``.
    coco_tfds: ``dataset.eval_gt_json`` when given; otherwise a COCO dict built
    on first access from *all* records of the split (one pass reading image
    headers only): ``images`` (id, file name, width/height of the stored image),
    ``annotations`` (TFDS's original annotation ids, ``bbox`` de-normalised to
    pixels — float32 round-off, ~1e-4 px — ``area`` as TFDS stores it (the
    COCO segmentation area truncated to an integer), ``iscrowd`` and the
    official category id) and the 80 ``categories``. It includes crowd
    annotations regardless of ``use_crowd``. Differences from the official
    json are these round-offs only.
    """
    if self._eval_gt is None and self._kind == "coco_tfds":
      self._eval_gt = _tfds_eval_gt(self)
    return self._eval_gt

  def __repr__(self):
    return (f"DatasetSource({self._kind}, {self.name!r}, split={self.split!r}, "
            f"len={len(self)}, num_classes={self.num_classes}, use_crowd={self.use_crowd})")


# ---------------------------------------------------------------------------
# coco_folder / digits
# ---------------------------------------------------------------------------

def _open_coco_folder(root, split: str, cfg, kind: str) -> DatasetSource:
  prepared = cf.prepare_coco_folder(root, split, cfg.data_dir, max_image_side=cfg.max_image_side)
  ds = prepared.data_source()
  cats = prepared.report["categories"]
  return DatasetSource(ds, kind=kind, name=str(root), split=split, use_crowd=cfg.use_crowd,
                       category_ids=[c["id"] for c in cats], class_names=[c["name"] for c in cats],
                       eval_gt=str(prepared.gt_path), report=prepared.report)


def _open_digits(split: str, cfg) -> DatasetSource:
  root = make_digits.ensure_digits(Path(cfg.root or DEFAULT_DIGITS_DIR).expanduser(),
                                   seed=cfg.digits_seed, num_train=cfg.digits_num_train,
                                   num_val=cfg.digits_num_val, workers=cfg.digits_workers)
  return _open_coco_folder(root, split, cfg, "digits")


# ---------------------------------------------------------------------------
# coco_tfds
# ---------------------------------------------------------------------------

def _convert_tfds_coco(r: dict, label_to_class: np.ndarray) -> dict:
  data = bytes(r["image"])
  with Image.open(io.BytesIO(data)) as im:  # header only: no pixel decode
    width, height = im.size
  bbox = np.asarray(r["objects"]["bbox"], np.float32).reshape(-1, 4)  # normalised y1 x1 y2 x2
  boxes = np.stack([bbox[:, 1] * width, bbox[:, 0] * height,
                    bbox[:, 3] * width, bbox[:, 2] * height], axis=1).astype(np.float32)
  labels = np.asarray(r["objects"]["label"], np.int64).reshape(-1)
  return {
      "image": data,
      "image_id": int(r["image/id"]),
      "height": int(height),
      "width": int(width),
      "boxes": boxes.reshape(-1, 4),
      "classes": label_to_class[labels].astype(np.int32),
      "is_crowd": np.asarray(r["objects"]["is_crowd"], bool).reshape(-1),
  }


def _tfds_eval_gt(src: DatasetSource) -> dict:
  images, anns = [], []
  for i in range(len(src._ds)):
    r = src._ds[i]
    rec = _convert_tfds_coco(r, src._label_to_class)
    fname = r.get("image/filename", b"")
    images.append({"id": rec["image_id"], "width": rec["width"], "height": rec["height"],
                   "file_name": fname.decode() if isinstance(fname, bytes) else str(fname)})
    ids = np.asarray(r["objects"]["id"]).reshape(-1)
    areas = np.asarray(r["objects"]["area"]).reshape(-1)
    for b, c, crowd, aid, area in zip(rec["boxes"], rec["classes"], rec["is_crowd"], ids, areas):
      w, h = float(b[2] - b[0]), float(b[3] - b[1])
      anns.append({"id": int(aid), "image_id": rec["image_id"],
                   "category_id": src.category_ids[int(c)],
                   "bbox": [float(b[0]), float(b[1]), w, h],
                   "area": float(area) if area > 0 else w * h, "iscrowd": int(bool(crowd))})
  cats = [{"id": i, "name": n} for i, n in zip(src.category_ids, src.class_names)]
  return {"images": images, "annotations": anns, "categories": cats}


def convert_command(version_dir) -> str:
  """The one-time in-place tfrecord -> array_record conversion command (TFDS CLI).

  Note: in TFDS 4.9.10 ``tfds convert_format`` imports ``apache_beam`` at start-up
  (even without ``--use_beam``), so it needs ``pip install apache-beam``;
  :func:`convert_to_array_record` does the same conversion without Beam.
  """
  return (f"tfds convert_format --dataset_version_dir={version_dir} "
          f"--out_file_format=array_record")


def convert_to_array_record(version_dir) -> list[Path]:
  """Beam-free in-place conversion of a tfrecord TFDS dataset version to array_record.

  Writes ``<name>-<split>.array_record-XXXXX-of-YYYYY`` beside every
  ``<name>-<split>.tfrecord-XXXXX-of-YYYYY`` shard (same records, same order,
  written as ``ArrayRecordWriter(path, 'group_size:1')`` like TFDS does; each
  shard goes to a temporary name first) and then adds ``array_record`` to
  ``alternativeFileFormats`` in ``dataset_info.json`` — what
  ``tfds convert_format`` does without ``--out_dir``. The tfrecord files are
  kept. Command line: ``python -m asff_jax.data.sources convert VERSION_DIR``.

  Args:
    version_dir: e.g. ``DATA_DIR/coco/2017/1.1.0``.

  Returns:
    The array_record shard paths written.
  """

  version_dir = Path(version_dir)
  info_path = version_dir / "dataset_info.json"
  info = json.loads(info_path.read_text())
  shards = sorted(version_dir.glob("*.tfrecord-*-of-*"))
  if not shards:
    raise FileNotFoundError(f"no tfrecord shards in {version_dir}")
  written = []
  for shard in shards:
    out = shard.with_name(shard.name.replace(".tfrecord-", ".array_record-"))
    tmp = out.with_name(out.name + ".incomplete")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    for rec in tf.data.TFRecordDataset(os.fspath(shard)).as_numpy_iterator():
      writer.write(rec)
    writer.close()
    os.replace(tmp, out)
    written.append(out)
    print(f"[convert] {shard.name} -> {out.name}", flush=True)
  alt = info.setdefault("alternativeFileFormats", [])
  if info.get("fileFormat") != "array_record" and "array_record" not in alt:
    alt.append("array_record")
  tmp = info_path.with_name(info_path.name + ".incomplete")
  tmp.write_text(json.dumps(info, indent=2))
  os.replace(tmp, info_path)
  return written


def _open_coco_tfds(split: str, cfg) -> DatasetSource:
  name = cfg.tfds_name
  data_dir = cfg.data_dir
  if data_dir is not None:
    data_dir = os.fspath(Path(data_dir).expanduser())
  located = tfds.builder(name, data_dir=data_dir)  # only to locate DATA_DIR/name/config/version
  if not Path(located.data_dir).joinpath("dataset_info.json").exists():
    raise MissingFileError(
        f"TFDS dataset {name} is not prepared in {located.data_dir} (data_dir={data_dir!r}). "
        f"This source never downloads: prepare it once with "
        f"`tfds build {name} --data_dir=DATA_DIR --file_format=array_record` (COCO 2017 needs "
        f"~25 GB of downloads), or use dataset.source='coco_folder' on a local COCO folder.")
  # Read through the on-disk metadata: TFDS 4.9.10's code-based builder ignores
  # `alternativeFileFormats` from dataset_info.json (what an in-place conversion adds).
  builder = tfds.builder_from_directory(located.data_dir)
  random_access = file_adapters.FileFormat.with_random_access()
  available = builder.info.available_file_formats()
  if not available & random_access:
    cmd = convert_command(builder.data_dir)
    raise DataError(
        f"TFDS dataset {name} in {builder.data_dir} is stored as "
        f"{sorted(f.value for f in available)}, which has no random access. Convert it once "
        f"(in place, adds array_record files beside the existing ones):\n  {cmd}\n"
        f"(TFDS's CLI needs `pip install apache-beam`; add --num_workers=N to parallelise, or "
        f"--out_dir=DIR to write elsewhere and point dataset.data_dir there.) Without Beam:\n"
        f"  python -m asff_jax.data.sources convert {builder.data_dir}")
  splits = set(builder.info.splits.keys())
  tfds_split = split
  if split not in splits and split == "val" and "validation" in splits:
    tfds_split = "validation"
  if tfds_split not in splits:
    raise ConfigError(f"split {split!r} not in {name}: available {sorted(splits)}")
  fmt = "array_record" if file_adapters.FileFormat.ARRAY_RECORD in available else None
  ds = builder.as_data_source(split=tfds_split, decoders={"image": tfds.decode.SkipDecoding()},
                              file_format=fmt)
  names = list(builder.info.features["objects"]["label"].names)
  # TFDS label i is the i-th category of the json (COCO lists them sorted by id). Map by name
  # when the names are COCO's (robust to order), else by position.
  by_name = {n: i for i, n in enumerate(COCO_CLASS_NAMES)}
  if len(names) == 80 and set(names) == set(COCO_CLASS_NAMES):
    label_to_class = np.array([by_name[n] for n in names], np.int64)
  elif len(names) == 80:
    label_to_class = np.arange(80, dtype=np.int64)
  else:
    raise DataError(f"{name}: expected 80 object labels, found {len(names)}")
  eval_gt = cfg.eval_gt_json
  return DatasetSource(ds, kind="coco_tfds", name=name, split=tfds_split,
                       use_crowd=cfg.use_crowd, category_ids=COCO_CATEGORY_IDS,
                       class_names=COCO_CLASS_NAMES,
                       eval_gt=os.fspath(eval_gt) if eval_gt else None,
                       label_to_class=label_to_class)


# ---------------------------------------------------------------------------

def open_source(dataset_cfg, split: str, *, num_classes: Optional[int] = None):
  """Open ``split`` of the dataset described by ``dataset_cfg`` (``config.dataset``).

  Args:
    dataset_cfg: the ``dataset`` section of a full config (:mod:`asff_jax.config`), or a
      plain dict of some of its keys (the others take the schema's defaults).
    split: split name, e.g. ``config.dataset.train_split``.
    num_classes: the class count of a ``'synthetic'`` source (``model.num_classes``).

  Returns:
    :class:`DatasetSource` (or a :class:`~asff_jax.data.synthetic.SyntheticSource`).

  Raises:
    ConfigError: unknown ``source`` or split; ``root`` missing for coco_folder.
    asff_jax.data.coco_folder.CocoFormatError: malformed annotation json.
    MissingFileError / DataError: coco_tfds not prepared / not array_record.
  """
  if isinstance(dataset_cfg, dict):
    dataset_cfg = config_lib.merge_config({"dataset": dataset_cfg}).dataset
  source = dataset_cfg.source
  if source == "coco_folder":
    if not dataset_cfg.root:
      raise ConfigError("dataset.source='coco_folder' needs dataset.root (a COCO-layout folder): "
                        "--config.dataset.root=DIR")
    return _open_coco_folder(Path(dataset_cfg.root).expanduser(), split, dataset_cfg, "coco_folder")
  if source == "digits":
    return _open_digits(split, dataset_cfg)
  if source == "coco_tfds":
    return _open_coco_tfds(split, dataset_cfg)
  if source == "synthetic":
    return synthetic.open_synthetic(dataset_cfg, split, 80 if num_classes is None else num_classes)
  raise ConfigError(f"unknown dataset.source {source!r}: expected 'coco_folder', 'coco_tfds', "
                    "'digits' or 'synthetic'")


def main(argv=None) -> int:
  """``python -m asff_jax.data.sources convert VERSION_DIR``: the Beam-free array_record conversion."""
  from asff_jax import cli  # pylint: disable=import-outside-toplevel  (cli sits above data/)

  args = list(sys.argv[1:] if argv is None else argv)
  positional = [a for a in args if not a.startswith("--")]

  def run(_f):
    if len(positional) != 2 or positional[0] != "convert":
      raise cli.UserError("usage: python -m asff_jax.data.sources convert VERSION_DIR")
    convert_to_array_record(positional[1])

  return cli.run(run, "asff_jax.data.sources", [a for a in args if a.startswith("--")])


if __name__ == "__main__":
  sys.exit(main())
