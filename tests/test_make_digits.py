"""Tests of asff_jax.data.make_digits (the built-in offline ``digits`` COCO dataset).

One small dataset (24 train / 8 val images) is generated per module and
checked for: pycocotools loading, categories, image files and sizes,
annotation counts, tight in-image boxes (re-derived from the alpha masks via
``render_image``), object-size spread, train/val disjointness of the digit
samples, determinism (also across worker counts), the ``python -m`` CLI and
``ensure_digits`` regeneration of an incomplete folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
  import asff_jax  # noqa: F401
except ImportError:  # running pytest without the package installed
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asff_jax.data import make_digits as md

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 24, 8
COUNTS = {"train": N_TRAIN, "val": N_VAL}


def _tree_bytes(root: Path) -> dict[str, bytes]:
  """Relative path -> bytes of every file under ``root``."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("digits") / "ds"
  root = md.make_digits(out, seed=0, num_train=N_TRAIN, num_val=N_VAL, workers=1, progress=False)
  assert root == out.absolute()
  return root


@pytest.fixture(scope="module")
def cocos(dataset):
  from pycocotools.coco import COCO
  return {s: COCO(str(dataset / "annotations" / f"instances_{s}.json")) for s in md.SPLITS}


def test_layout_and_marker(dataset):
  assert (dataset / md.MARKER).is_file()
  params = json.loads((dataset / md.MARKER).read_text())
  assert params["seed"] == 0 and params["num_train"] == N_TRAIN and params["num_val"] == N_VAL
  for s in md.SPLITS:
    assert (dataset / "annotations" / f"instances_{s}.json").is_file()
    assert len(list((dataset / s).glob("*.jpg"))) == COUNTS[s]
  # no temporary folders left beside the dataset
  assert sorted(p.name for p in dataset.parent.iterdir()) == [dataset.name]
  assert md.is_complete(dataset, seed=0, num_train=N_TRAIN, num_val=N_VAL)
  assert not md.is_complete(dataset, seed=1)


def test_categories(cocos):
  for coco in cocos.values():
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, 11))
    assert [c["name"] for c in cats] == [str(d) for d in range(10)]
    assert all(c["supercategory"] == "digit" for c in cats)


def test_images_and_annotations(dataset, cocos):
  all_shapes = []
  for s, coco in cocos.items():
    img_ids = sorted(coco.getImgIds())
    assert img_ids == list(range(1, COUNTS[s] + 1))
    for info in coco.loadImgs(img_ids):
      path = dataset / s / info["file_name"]
      with Image.open(path) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == (info["width"], info["height"])
      w, h = info["width"], info["height"]
      assert 240 <= w <= 480 and 240 <= h <= 480
      all_shapes.append((w, h))
      anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
      assert 1 <= len(anns) <= 12
      for a in anns:
        x, y, bw, bh = a["bbox"]
        assert all(isinstance(v, int) for v in a["bbox"])
        assert bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
        assert a["area"] == bw * bh and a["iscrowd"] == 0
        assert 1 <= a["category_id"] <= 10
    ann_ids = coco.getAnnIds()
    assert sorted(ann_ids) == list(range(1, len(ann_ids) + 1))
  assert any(w != h for w, h in all_shapes)
  assert len({w for w, _ in all_shapes}) > 5 and len({h for _, h in all_shapes}) > 5


def test_boxes_tight_and_match_render(dataset, cocos):
  """The json equals a fresh render, and every box is the bounding box of alpha > threshold."""
  for s, coco in cocos.items():
    for index in (0, 1, COUNTS[s] - 1):
      r = md.render_image(0, s, index)
      anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=index + 1)), key=lambda a: a["id"])
      assert [a["bbox"] for a in anns] == [o["bbox"] for o in r["objects"]]
      assert [a["category_id"] for a in anns] == [o["category_id"] for o in r["objects"]]
      assert [a["digit_index"] for a in anns] == [o["digit_index"] for o in r["objects"]]
      for o in r["objects"]:
        ys, xs = np.nonzero(o["alpha"] > md.ALPHA_THRESHOLD)
        ox, oy = o["offset"]
        x0, y0 = ox + xs.min(), oy + ys.min()
        assert o["bbox"] == [x0, y0, ox + xs.max() + 1 - x0, oy + ys.max() + 1 - y0]
        # the 8x8 source margins are not in the box: the patch is strictly larger than the box
        ph, pw = o["alpha"].shape
        assert o["bbox"][2] < pw and o["bbox"][3] < ph
      # the written JPEG is the rendered image (up to compression)
      info = coco.loadImgs(index + 1)[0]
      with Image.open(dataset / s / info["file_name"]) as im:
        decoded = np.asarray(im.convert("RGB"), np.float32)
      assert decoded.shape == r["image"].shape
      assert np.abs(decoded - r["image"].astype(np.float32)).mean() < 6.0


def test_digit_labels_match_sklearn(cocos):
  from sklearn.datasets import load_digits
  target = load_digits().target
  for coco in cocos.values():
    for a in coco.loadAnns(coco.getAnnIds()):
      assert a["category_id"] == int(target[a["digit_index"]]) + 1


def test_object_size_spread(cocos):
  areas = np.array([a["area"] for c in cocos.values() for a in c.loadAnns(c.getAnnIds())])
  assert (areas < 32 ** 2).sum() >= 5, "expected small objects"
  assert ((areas >= 32 ** 2) & (areas <= 96 ** 2)).sum() >= 5, "expected medium objects"
  assert (areas > 96 ** 2).sum() >= 2, "expected large objects"
  assert areas.min() >= 4  # ~10 px digits are still a few pixels wide


def test_splits_disjoint(cocos):
  pools = md.digit_split_indices(0)
  assert len(pools["train"]) + len(pools["val"]) == 1797
  assert not set(pools["train"].tolist()) & set(pools["val"].tolist())
  used = {s: {a["digit_index"] for a in c.loadAnns(c.getAnnIds())} for s, c in cocos.items()}
  assert used["train"] and used["val"]
  assert not used["train"] & used["val"]
  assert used["train"] <= set(pools["train"].tolist())
  assert used["val"] <= set(pools["val"].tolist())
  other = md.digit_split_indices(1)
  assert not np.array_equal(other["val"], pools["val"])


def test_deterministic_across_runs_and_workers(dataset, tmp_path):
  again = md.make_digits(tmp_path / "again", seed=0, num_train=N_TRAIN, num_val=N_VAL, workers=2,
                         progress=False)
  assert _tree_bytes(again) == _tree_bytes(dataset)
  other = md.make_digits(tmp_path / "other", seed=1, num_train=4, num_val=2, workers=1, progress=False)
  a, b = _tree_bytes(other), _tree_bytes(dataset)
  assert a["train/000000000001.jpg"] != b["train/000000000001.jpg"]
  assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]
  # image i does not depend on how many images are requested
  ja = json.loads(a["annotations/instances_val.json"])
  small = md.make_digits(tmp_path / "small", seed=0, num_train=3, num_val=1, workers=1, progress=False)
  assert (small / "train" / "000000000003.jpg").read_bytes() == b["train/000000000003.jpg"]
  assert ja["images"][0]["file_name"] == "000000000001.jpg"


def test_cli(tmp_path):
  out = tmp_path / "cli"
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "asff_jax.data.make_digits", "--out", str(out), "--seed", "3",
       "--num-train", "3", "--num-val", "2"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "[digits] wrote 5 images" in proc.stdout
  assert md.is_complete(out, seed=3, num_train=3, num_val=2)
  from pycocotools.coco import COCO
  assert len(COCO(str(out / "annotations" / "instances_val.json")).getImgIds()) == 2
  assert len(list((out / "train").glob("*.jpg"))) == 3


def test_ensure_digits_regenerates_incomplete(tmp_path, capsys):
  root = tmp_path / "cache"
  got = md.ensure_digits(root, seed=0, num_train=2, num_val=1, progress=False)
  assert got == root.absolute() and md.is_complete(root, seed=0, num_train=2, num_val=1)
  reference = _tree_bytes(root)

  # complete: reused untouched
  stamp = (root / md.MARKER).stat().st_mtime_ns
  (root / "extra.txt").write_text("kept")
  md.ensure_digits(root, seed=0, num_train=2, num_val=1, progress=False)
  assert (root / "extra.txt").exists() and (root / md.MARKER).stat().st_mtime_ns == stamp

  # half-written (no marker, a missing image): regenerated identically
  (root / md.MARKER).unlink()
  (root / "train" / "000000000002.jpg").unlink()
  assert not md.is_complete(root)
  md.ensure_digits(root, seed=0, num_train=2, num_val=1, progress=True)
  assert "generating" in capsys.readouterr().out
  assert _tree_bytes(root) == reference

  # different parameters: regenerated
  md.ensure_digits(root, seed=0, num_train=3, num_val=1, progress=False)
  assert md.is_complete(root, seed=0, num_train=3, num_val=1)
  assert len(list((root / "train").glob("*.jpg"))) == 3


def test_render_image_rejects_bad_args():
  with pytest.raises(ValueError):
    md.render_image(0, "test", 0)
  with pytest.raises(ValueError):
    md.render_image(0, "train", -1)
  with pytest.raises(ValueError):
    md.make_digits("/nonexistent/never", num_train=-1)
