"""Dataset sources: the common random-access interface over coco_folder, digits and coco_tfds.

All data is made in ``tmp_path``: tiny COCO folders written with PIL, a tiny
``digits`` set, and a tiny ``coco/2017`` written by TFDS itself with the real
TFDS COCO feature layout (no download).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asff_jax.evaluation.coco_eval import CocoEvaluator
from asff_jax.data import coco_folder as cf
from asff_jax.errors import DataError
from asff_jax.data.sources import (COCO_CATEGORY_IDS, COCO_CLASS_NAMES, RECORD_KEYS,
                                   convert_to_array_record, open_source)


def write_folder(root: Path, split: str, images: list[dict], annotations: list[dict],
                 categories: list[dict]) -> Path:
  """Write ``root/annotations/instances_<split>.json`` and solid-colour images.

  Each ``images`` entry may carry a private ``_size`` (w, h) for the file (defaults to the json
  size) which is not written to the json.
  """
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  (root / split).mkdir(parents=True, exist_ok=True)
  clean = []
  for k, im in enumerate(images):
    w, h = im.get("_size", (im["width"], im["height"]))
    Image.new("RGB", (w, h), (20 * k % 255, 90, 160)).save(root / split / im["file_name"],
                                                          quality=95)
    clean.append({k2: v for k2, v in im.items() if not k2.startswith("_")})
  path = root / "annotations" / f"instances_{split}.json"
  path.write_text(json.dumps({"images": clean, "annotations": annotations,
                              "categories": categories}))
  return path


CATS = [{"id": 12, "name": "c12"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]


def small_folder(root: Path, split: str = "val"):
  images = [{"id": 101, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 205, "file_name": "b.png", "width": 24, "height": 36},
            {"id": 7, "file_name": "c.jpg", "width": 32, "height": 32}]
  anns = [
      {"id": 1, "image_id": 101, "category_id": 3, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
      {"id": 2, "image_id": 101, "category_id": 12, "bbox": [5.5, 1, 20, 20], "area": 400,
       "iscrowd": 1},
      {"id": 3, "image_id": 205, "category_id": 7, "bbox": [0, 0, 24, 36], "area": 864,
       "iscrowd": 0},
  ]
  return write_folder(root, split, images, anns, CATS)


def cfg_for(tmp_path, root, **kw):
  return dict(source="coco_folder", root=str(root), data_dir=str(tmp_path / "tfds"), **kw)


def test_coco_folder_records_and_metadata(tmp_path):
  small_folder(tmp_path / "ds")
  src = open_source(cfg_for(tmp_path, tmp_path / "ds"), "val")
  assert len(src) == 3
  assert src.category_ids == [3, 7, 12] and src.num_classes == 3
  assert src.class_names == ["c3", "c7", "c12"]
  r = src[0]
  assert set(r) == set(RECORD_KEYS)
  assert isinstance(r["image"], bytes) and r["image_id"] == 101
  assert (r["width"], r["height"]) == (40, 30)
  assert Image.open(io.BytesIO(r["image"])).size == (40, 30)
  assert r["boxes"].dtype == np.float32 and r["classes"].dtype == np.int32
  assert r["is_crowd"].dtype == bool
  np.testing.assert_allclose(r["boxes"], [[2, 3, 12, 11], [5.5, 1, 25.5, 21]])
  np.testing.assert_array_equal(r["classes"], [0, 2])       # ids 3 and 12 -> sorted positions
  np.testing.assert_array_equal(r["is_crowd"], [False, True])
  r1 = src[1]
  assert r1["image_id"] == 205 and r1["image"][:4] == b"\x89PNG"
  np.testing.assert_array_equal(r1["classes"], [1])
  empty = src[-1]                                               # background image kept
  assert empty["image_id"] == 7 and empty["boxes"].shape == (0, 4)
  assert empty["classes"].shape == (0,) and empty["is_crowd"].shape == (0,)
  batch = src.__getitems__([2, 0])
  assert [b["image_id"] for b in batch] == [7, 101]
  with pytest.raises(IndexError):
    src[3]
  # Picklable for worker processes.
  again = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(again[0]["boxes"], r["boxes"])


def test_use_crowd_false_and_eval_gt_keeps_crowd(tmp_path):
  small_folder(tmp_path / "ds")
  src = open_source(cfg_for(tmp_path, tmp_path / "ds", use_crowd=False), "val")
  r = src[0]
  np.testing.assert_array_equal(r["classes"], [0])
  assert not r["is_crowd"].any()
  gt = json.loads(Path(src.eval_gt).read_text())
  assert sorted(im["id"] for im in gt["images"]) == [7, 101, 205]
  crowd = [a for a in gt["annotations"] if a["iscrowd"]]
  assert [a["id"] for a in crowd] == [2] and crowd[0]["bbox"] == [5.5, 1.0, 20.0, 20.0]
  assert {a["id"] for a in gt["annotations"]} == {1, 2, 3}
  # The evaluator accepts it; perfect detections of the non-crowd GT give AP 1.
  ev = CocoEvaluator(src.eval_gt)
  for rec in src:
    ev.add(rec["image_id"], rec["boxes"], np.ones(len(rec["boxes"])), rec["classes"],
           input_hw=(rec["height"], rec["width"]))
  assert ev.evaluate()["AP"] == pytest.approx(1.0)


def test_prepared_once_and_identity_depends_on_folder_and_json(tmp_path, capsys):
  json_path = small_folder(tmp_path / "ds")
  cfg = cfg_for(tmp_path, tmp_path / "ds")
  a = open_source(cfg, "val")
  capsys.readouterr()
  b = open_source(cfg, "val")
  assert "reusing" in capsys.readouterr().out
  assert a.eval_gt == b.eval_gt
  # Another folder with identical content -> a different prepared directory.
  small_folder(tmp_path / "other")
  c = open_source(cfg_for(tmp_path, tmp_path / "other"), "val")
  assert c.eval_gt != a.eval_gt
  # Editing the json re-prepares.
  data = json.loads(json_path.read_text())
  data["annotations"] = data["annotations"][:1]
  json_path.write_text(json.dumps(data))
  d = open_source(cfg, "val")
  assert d.eval_gt != a.eval_gt
  assert d[0]["boxes"].shape == (1, 4) and a[0]["boxes"].shape == (2, 4)
  report = json.loads((Path(d.eval_gt).parent / cf.REPORT_FILE).read_text())
  assert report["counts"]["boxes_kept"] == 1 and report["root"] == str(tmp_path / "ds")


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="dataset.root"):
    open_source(dict(source="coco_folder", data_dir=str(tmp_path)), "val")
  with pytest.raises(ValueError, match="unknown dataset.source"):
    open_source(dict(source="nope"), "val")
  (tmp_path / "empty").mkdir()
  with pytest.raises(cf.CocoFormatError, match="instances_val.json"):
    open_source(cfg_for(tmp_path, tmp_path / "empty"), "val")


def test_digits_goes_through_coco_folder(tmp_path):
  cfg = dict(source="digits", root=str(tmp_path / "digits"), data_dir=str(tmp_path / "tfds"),
             digits_num_train=4, digits_num_val=2, digits_workers=1)
  train = open_source(cfg, "train")
  val = open_source(cfg, "val")
  assert len(train) == 4 and len(val) == 2
  assert train.category_ids == list(range(1, 11)) and train.class_names[0] == "0"
  assert (tmp_path / "digits" / "annotations" / "instances_train.json").exists()
  src_json = json.loads((tmp_path / "digits" / "annotations" / "instances_val.json").read_text())
  gt = json.loads(Path(val.eval_gt).read_text())
  assert len(gt["annotations"]) == len(src_json["annotations"])
  r = val[0]
  ann = [a for a in src_json["annotations"] if a["image_id"] == r["image_id"]]
  x, y, w, h = ann[0]["bbox"]
  np.testing.assert_allclose(r["boxes"][0], [x, y, x + w, y + h])
  assert r["classes"][0] == ann[0]["category_id"] - 1
  assert Image.open(io.BytesIO(r["image"])).size == (r["width"], r["height"])
  assert val.report["counts"]["image_reencoded"] == 0   # clean JPEGs are stored byte-for-byte


# ---------------------------------------------------------------------------
# coco_tfds: a tiny coco/2017 written by TFDS with the real COCO feature layout
# ---------------------------------------------------------------------------

def _fake_coco_records():
  rng = np.random.default_rng(0)
  recs = []
  for k, (w, h) in enumerate([(40, 30), (20, 50), (33, 33)]):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, "JPEG")
    objs = [] if k == 2 else [
        {"id": 10 * k + 1, "area": 50, "bbox": np.array([0.1, 0.2, 0.5, 0.6], np.float32),
         "label": 79 if k == 0 else 11, "is_crowd": False},
        {"id": 10 * k + 2, "area": 100, "bbox": np.array([0.0, 0.0, 1.0, 1.0], np.float32),
         "label": 0, "is_crowd": True},
    ]
    recs.append({"image": buf.getvalue(), "image/filename": f"{k:012d}.jpg",
                 "image/id": 1000 + k, "objects": objs})
  return recs


def write_fake_coco(data_dir: Path, file_format: str) -> Path:
  """``data_dir/coco/2017/<version>`` with the real builder's features, written by TFDS."""
  import tensorflow_datasets as tfds
  real = tfds.builder("coco/2017", data_dir=str(data_dir / "_unused"))
  features = real.info.features
  features["objects"]["label"].names = COCO_CLASS_NAMES
  version = str(real.version)

  class FakeCoco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "coco"
    VERSION = tfds.core.Version(version)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017")]
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for k, rec in enumerate(_fake_coco_records()):
        yield k, rec

  b = FakeCoco(data_dir=str(data_dir))
  b.download_and_prepare(file_format=file_format)
  return Path(b.data_dir)


def test_coco_tfds_array_record(tmp_path):
  write_fake_coco(tmp_path / "tfds", "array_record")
  cfg = dict(source="coco_tfds", data_dir=str(tmp_path / "tfds"))
  src = open_source(cfg, "val")                # alias of 'validation'
  assert len(src) == 3 and src.num_classes == 80
  assert src.category_ids == COCO_CATEGORY_IDS and src.category_ids[-1] == 90
  by_id = {src[i]["image_id"]: src[i] for i in range(3)}
  r = by_id[1000]
  assert set(r) == set(RECORD_KEYS) and (r["width"], r["height"]) == (40, 30)
  # normalised [ymin, xmin, ymax, xmax] -> pixel [x1, y1, x2, y2]
  np.testing.assert_allclose(r["boxes"], [[0.2 * 40, 0.1 * 30, 0.6 * 40, 0.5 * 30],
                                          [0, 0, 40, 30]], rtol=1e-6)
  np.testing.assert_array_equal(r["classes"], [79, 0])
  np.testing.assert_array_equal(r["is_crowd"], [False, True])
  assert by_id[1002]["boxes"].shape == (0, 4)
  gt = src.eval_gt
  assert sorted(im["id"] for im in gt["images"]) == [1000, 1001, 1002]
  a = {x["id"]: x for x in gt["annotations"]}
  assert a[1]["category_id"] == 90 and a[11]["category_id"] == 13   # label 11 = stop sign
  assert a[2]["iscrowd"] == 1 and a[2]["bbox"] == pytest.approx([0, 0, 40, 30])
  CocoEvaluator(gt)  # loads in pycocotools
  no_crowd = open_source(dict(cfg, use_crowd=False), "validation")
  assert not any(no_crowd[i]["is_crowd"].any() for i in range(3))
  assert len(no_crowd.eval_gt["annotations"]) == 4
  pickle.loads(pickle.dumps(no_crowd))[0]


def test_coco_tfds_tfrecord_needs_conversion(tmp_path):
  version_dir = write_fake_coco(tmp_path / "tfds", "tfrecord")
  cfg = dict(source="coco_tfds", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError) as err:
    open_source(cfg, "validation")
  msg = str(err.value)
  cmd = f"tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record"
  assert cmd in msg
  assert f"python -m asff_jax.data.sources convert {version_dir}" in msg
  # The Beam-free fallback conversion (the TFDS CLI needs apache_beam, absent here) makes the
  # same dataset usable, with identical records.
  convert_to_array_record(version_dir)
  assert (version_dir / "coco-validation.array_record-00000-of-00001").exists()
  src = open_source(cfg, "validation")
  assert len(src) == 3
  ids = sorted(src[i]["image_id"] for i in range(3))
  assert ids == [1000, 1001, 1002]
  r = [src[i] for i in range(3) if src[i]["image_id"] == 1001][0]
  np.testing.assert_array_equal(r["classes"], [11, 0])


def test_coco_tfds_not_prepared(tmp_path):
  with pytest.raises(FileNotFoundError, match="never downloads"):
    open_source(dict(source="coco_tfds", data_dir=str(tmp_path / "none")), "validation")


def test_every_source_feeds_training_and_eval_batches(tmp_path):
  """coco_tfds, coco_folder and digits records go through the real pipeline with the right shapes."""
  from asff_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  write_fake_coco(tmp_path / "tfds", "array_record")
  tfds_src = open_source(dict(source="coco_tfds", data_dir=str(tmp_path / "tfds")), "val")
  digits = open_source(dict(source="digits", root=str(tmp_path / "digits"),
                            data_dir=str(tmp_path / "prep"), digits_num_train=12,
                            digits_num_val=4), "train")
  folder = open_source(dict(source="coco_folder", root=str(tmp_path / "digits"),
                            data_dir=str(tmp_path / "prep2")), "val")
  for src in (tfds_src, digits, folder):
    batch = next(pipeline.train_batches(src, seed=0, global_batch_size=2, size_schedule=64,
                                        mixup_schedule=True, max_boxes=8, num_steps=1,
                                        process_index=0, process_count=1))
    assert batch["images"].shape == (2, 64, 64, 3) and batch["images"].dtype == np.float32
    assert batch["labels"].shape == (2, 8, 6) and np.isfinite(batch["images"]).all()
    ev = next(pipeline.eval_batches(src, size=64, batch_size=2, process_index=0, process_count=1))
    assert ev["images"].shape == (2, 64, 64, 3) and ev["orig_hw"].shape == (2, 2)
    assert set(ev["image_ids"][ev["valid"]]) <= {int(src[i]["image_id"]) for i in range(len(src))}
