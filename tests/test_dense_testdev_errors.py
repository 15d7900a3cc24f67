"""Crowded scenes (≥ 300 boxes) through preparation, training, evaluation and predict; COCO test-dev
(images only) results; the annotation json hashed once; a user's mistakes end in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from asff_jax.data import coco_folder, loader
from asff_jax.models import create_model, random_variables
from tests.conftest import tiny_config

DENSE = 320  # boxes in the crowded image


def _write_folder(root: Path, split: str, images, anns, *, images_only=False, folder=None):
  """images: [(id, w, h)]; anns: [(image_id, category_id, [x, y, w, h])]; files are noise JPEGs."""
  rng = np.random.default_rng(0)
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  img_dir = root / (folder or split)
  img_dir.mkdir(parents=True, exist_ok=True)
  for i, w, h in images:
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(img_dir / f"{i:06d}.jpg")
  data = {"images": [{"id": i, "file_name": f"{i:06d}.jpg", "width": w, "height": h} for i, w, h in images],
          "categories": [{"id": 3, "name": "person"}, {"id": 9, "name": "boat"}]}
  if not images_only:
    data["annotations"] = [{"id": k + 1, "image_id": im, "category_id": c, "bbox": bb, "area": bb[2] * bb[3],
                            "iscrowd": 0} for k, (im, c, bb) in enumerate(anns)]
  name = f"image_info_{split}.json" if images_only else f"instances_{split}.json"
  (root / "annotations" / name).write_text(json.dumps(data))
  return root


def _dense_folder(tmp_path):
  images = [(1, 320, 256), (2, 160, 120), (3, 200, 150)]
  anns = [(1, 3 if k % 2 else 9, [float(10 * (k % 30)), float(12 * (k // 30)), 9.0, 11.0])
          for k in range(DENSE)]
  anns += [(2, 3, [10.0, 10.0, 50.0, 40.0]), (3, 9, [20.0, 30.0, 60.0, 50.0]), (3, 3, [5.0, 5.0, 20, 20])]
  return _write_folder(tmp_path / "dense", "train", images, anns)


def _config(tmp_path, root, **dataset):
  c = tiny_config()
  c.dataset.source = "coco_folder"
  c.dataset.root = str(root)
  c.dataset.data_dir = str(tmp_path / "tfds")
  c.dataset.train_split = c.dataset.eval_split = "train"
  c.model.num_classes = 2
  c.batch_size = 2
  c.num_train_steps = 2
  c.eval_every_steps = 0
  c.eval_at_end = False
  c.write_tensorboard = False
  for k, v in dataset.items():
    c.dataset[k] = v
  return c


def test_crowded_images_prepare_warn_train_evaluate_and_predict(tmp_path, capsys, caplog):
  from asff_jax import Detector  # pylint: disable=import-outside-toplevel
  from asff_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  from asff_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel

  root = _dense_folder(tmp_path)
  prepared = coco_folder.prepare_coco_folder(root, "train", tmp_path / "tfds")
  out = capsys.readouterr().out
  assert f"boxes per image: median 2, 99th percentile {DENSE}, largest {DENSE}; 1 images have more than 50" in out
  assert coco_folder.boxes_per_image(prepared.report)[[1, 2, DENSE]].tolist() == [1, 1, 1]

  # the default caps (max_boxes 20 in tiny, max_raw_boxes 100) drop boxes: the warning has the counts
  config = _config(tmp_path, root)
  cap = min(config.dataset.max_boxes, config.dataset.max_raw_boxes)
  msg = loader.crowding_message(loader.train_source(config), config)
  assert (f"1 of 3 training images have more than {cap} boxes" in msg
          and f"{DENSE - cap} boxes are dropped per epoch" in msg
          and f"--config.dataset.max_boxes={DENSE} --config.dataset.max_raw_boxes={DENSE}" in msg)
  assert loader.crowding_message(loader.train_source(config), _config(
      tmp_path, root, max_boxes=DENSE, max_raw_boxes=DENSE)) is None

  # training with 310 label rows per image (10 boxes of the crowded image over the cap): it runs,
  # and warns once, at start
  keep = DENSE - 10
  config = _config(tmp_path, root, max_boxes=keep, max_raw_boxes=DENSE)
  config.eval.max_detections = 500
  with caplog.at_level(logging.WARNING, logger="asff_jax"):
    state = train_and_evaluate(config, str(tmp_path / "run"), show_progress=False)
  msgs = [r.getMessage() for r in caplog.records if "boxes are dropped" in r.getMessage()]
  assert len(msgs) == 1 and "1 of 3 training images have more than 310 boxes" in msgs[0], msgs
  assert ": 10 boxes are dropped per epoch" in msgs[0], msgs
  assert int(jax.device_get(state.step)) == 2
  batch = next(loader.make_train_iterator(_resolved(config), 0))
  assert batch["labels"].shape[1] == keep
  variables = random_variables(create_model(config), seed=3)
  m = evaluator.evaluate_variables(config, variables, out_dir=str(tmp_path / "eval"), show_progress=False,
                                   per_class=True)
  gt = json.loads(Path(loader.eval_source(config).eval_gt).read_text())
  assert m["num_images"] == 3 and sum(r["num_gt"] for r in m["per_class"]) == len(gt["annotations"]) == DENSE + 3
  results = json.loads((tmp_path / "eval" / "train_results.json").read_text())
  per_image = np.bincount([r["image_id"] for r in results])
  assert per_image.max() <= 500
  det = Detector(config, variables, score_thre=0.0)
  image = np.asarray(Image.open(root / "train" / "000001.jpg"))
  found = det(image)
  assert 100 < len(found.scores) <= 500  # random weights score everything: the 500 cap, not COCO's 100


def _resolved(config):
  from asff_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.resolve_config(config, **loader.dataset_info(loader.train_source(config)))


def test_test_dev_images_only_split_writes_server_results(tmp_path, caplog):
  from asff_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel

  images = [(101, 320, 240), (205, 160, 200)]
  root = _write_folder(tmp_path / "coco", "test-dev2017", images, [], images_only=True, folder="test2017")
  config = _config(tmp_path, root)
  config.dataset.eval_split = "test-dev2017"
  config.eval.results_name = "mine"
  source = loader.eval_source(config)
  assert len(source) == 2 and source.report["images_only"]
  variables = random_variables(create_model(config), seed=1)
  with caplog.at_level(logging.INFO, logger="asff_jax"):
    m = evaluator.evaluate_variables(config, variables, out_dir=str(tmp_path / "out"), show_progress=False)
  path = tmp_path / "out" / "detections_test-dev2017_mine_results.json"
  assert m["results_file"] == str(path) and "AP" not in m and m["num_images"] == 2
  assert any("metrics skipped" in r.getMessage() for r in caplog.records)
  rows = json.loads(path.read_text())
  assert rows and {r["image_id"] for r in rows} <= {101, 205} and {r["category_id"] for r in rows} <= {3, 9}
  # xywh in original pixels: the same detections as the evaluator's own (original-pixel) results
  assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0 for r in rows)
  gt = {"images": [{"id": i, "width": w, "height": h, "file_name": "x"} for i, w, h in images],
        "annotations": [], "categories": [{"id": 3, "name": "person"}, {"id": 9, "name": "boat"}]}
  from asff_jax.evaluation.coco_eval import CocoEvaluator  # pylint: disable=import-outside-toplevel
  ref = CocoEvaluator(gt)
  ref.add_results_json(path)
  assert ref.results() == rows
  cx = np.array([r["bbox"][0] + r["bbox"][2] / 2 for r in rows if r["image_id"] == 101])
  assert cx.size and np.median(cx) > 64  # in 320-px original pixels, not the 64-px input
  assert "no annotations: detections written to" in evaluator.format_metrics(m)
  # an instances file without 'annotations' is still an error
  bad = _write_folder(tmp_path / "bad", "val", images, [], images_only=True)
  (bad / "annotations" / "image_info_val.json").rename(bad / "annotations" / "instances_val.json")
  with pytest.raises(coco_folder.CocoFormatError, match="instances_val.json: missing required top-level key 'annotations'"):
    coco_folder.prepare_coco_folder(bad, "val", tmp_path / "tfds")


def test_annotation_json_hashed_once_per_process(tmp_path, monkeypatch):
  root = _write_folder(tmp_path / "c", "val", [(1, 64, 48)], [(1, 3, [1.0, 2.0, 10.0, 10.0])])
  calls = []
  real = coco_folder.hashlib.sha256

  class Counting:
    @staticmethod
    def sha256(*a):
      calls.append(a)
      return real(*a)

  monkeypatch.setattr(coco_folder, "hashlib", Counting)
  monkeypatch.setattr(coco_folder, "_FINGERPRINTS", {})
  first = coco_folder.prepare_coco_folder(root, "val", tmp_path / "tfds", progress=False)
  for _ in range(3):
    again = coco_folder.prepare_coco_folder(root, "val", tmp_path / "tfds", progress=False)
    assert again.version_dir == first.version_dir
  assert len(calls) == 1
  # the digest is the one of hashing the bytes directly (existing prepared folders stay valid)
  h = real((root / "annotations" / "instances_val.json").read_bytes())
  h.update(f"\0{root.absolute()}\0val\0{coco_folder.PREP_VERSION}\0{coco_folder.DEFAULT_MAX_IMAGE_SIDE}".encode())
  assert first.version_dir.parent.name.endswith(h.hexdigest()[:16])
  # an edited json is hashed (and prepared) again
  path = root / "annotations" / "instances_val.json"
  path.write_text(path.read_text().replace('"person"', '"human"'))
  edited = coco_folder.prepare_coco_folder(root, "val", tmp_path / "tfds", progress=False)
  assert edited.version_dir != first.version_dir and len(calls) == 2


# ----------------------------------------------------------------------------- one-line errors


def _one_line_error(main, argv, capsys) -> str:
  code = main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert "Traceback" not in err and len(err.splitlines()) == 1, err
  return err


def test_user_mistakes_end_in_one_line(tmp_path, capsys):
  from asff_jax import evaluate, train  # pylint: disable=import-outside-toplevel

  tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
  base = [f"--config={tiny}", f"--workdir={tmp_path / 'w'}", "--config.dataset.source=coco_folder",
          f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.dataset.train_split=train"]
  # malformed annotation json
  root = _write_folder(tmp_path / "broken", "train", [(1, 64, 48)], [])
  (root / "annotations" / "instances_train.json").write_text('{"images": [')
  err = _one_line_error(train.main, base + [f"--config.dataset.root={root}"], capsys)
  assert "instances_train.json: malformed json" in err
  # incomplete json
  (root / "annotations" / "instances_train.json").write_text('{"images": [], "categories": []}')
  err = _one_line_error(train.main, base + [f"--config.dataset.root={root}"], capsys)
  assert "instances_train.json: missing required top-level key 'annotations'" in err
  # a missing folder, a missing split
  err = _one_line_error(train.main, base + [f"--config.dataset.root={tmp_path / 'nowhere'}"], capsys)
  assert "nowhere" in err and "not found" in err
  good = _dense_folder(tmp_path)
  err = _one_line_error(train.main, base + [f"--config.dataset.root={good}",
                                            "--config.dataset.train_split=val2017"], capsys)
  assert "instances_val2017.json" in err and "not found" in err
  # num_classes that does not match the dataset (2 categories)
  err = _one_line_error(train.main, base + [f"--config.dataset.root={good}", "--config.model.num_classes=7"],
                        capsys)
  assert "model.num_classes=7" in err and "2 categories" in err
  # an unknown config key
  err = _one_line_error(train.main, base + ["--config.dataset.no_such_key=1"], capsys)
  assert "unknown config key" in err and "dataset.no_such_key" in err
  # a workdir without a checkpoint
  (tmp_path / "empty").mkdir()
  from asff_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  config_lib.write_config_json(tiny_config(), tmp_path / "empty" / "config.json")
  err = _one_line_error(evaluate.main, [f"--workdir={tmp_path / 'empty'}"], capsys)
  assert "no checkpoint under" in err
