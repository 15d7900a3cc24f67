"""Bad-data policy of the coco_folder preparation (see asff_jax/data/coco_folder.py).

One tiny COCO folder holds one instance of every defect; it is prepared once per
module and each test checks one row of the policy table. Fatal json problems
are checked separately (they fail before anything is written).
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asff_jax.data import coco_folder as cf
from asff_jax.data.sources import open_source

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def _jpeg(im, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, "JPEG", quality=95, **kw)
  return buf.getvalue()


def _png(im) -> bytes:
  buf = io.BytesIO()
  im.save(buf, "PNG")
  return buf.getvalue()


def _solid(w, h, colour=(40, 120, 200)):
  return Image.new("RGB", (w, h), colour)


def _bad_folder(root: Path):
  split = root / "val"
  split.mkdir(parents=True)
  (root / "annotations").mkdir()
  files = {}
  files["good.jpg"] = _jpeg(_solid(40, 30))
  files["corrupt.jpg"] = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
  files["truncated.jpg"] = _jpeg(Image.fromarray(
      np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))[:400]
  files["empty.jpg"] = b""
  files["text.jpg"] = b"this is not an image\n"
  files["gray.png"] = _png(Image.new("L", (20, 20), 77))
  files["rgba.png"] = _png(Image.new("RGBA", (20, 20), (10, 20, 30, 0)))
  files["cmyk.jpg"] = _jpeg(Image.new("CMYK", (20, 20), (0, 255, 255, 0)))
  gray16 = Image.fromarray(np.full((20, 20), 32896, np.uint16))  # 32896 / 257 = 128
  files["gray16.png"] = _png(gray16)
  files["mismatch.jpg"] = _jpeg(_solid(40, 30))
  files["nobox.jpg"] = _jpeg(_solid(16, 16))
  files["big.jpg"] = _jpeg(_solid(100, 50))
  files["tiny.png"] = _png(_solid(1, 1))
  bmp = io.BytesIO()
  _solid(12, 10).save(bmp, "BMP")
  files["plain.bmp"] = bmp.getvalue()
  for name, data in files.items():
    (split / name).write_bytes(data)

  sizes = {"good.jpg": (40, 30), "corrupt.jpg": (10, 10), "truncated.jpg": (64, 64),
           "empty.jpg": (10, 10), "text.jpg": (10, 10), "missing.jpg": (10, 10),
           "gray.png": (20, 20), "rgba.png": (20, 20), "cmyk.jpg": (20, 20),
           "gray16.png": (20, 20), "mismatch.jpg": (50, 50), "nobox.jpg": (16, 16),
           "big.jpg": (100, 50), "tiny.png": (1, 1), "plain.bmp": (12, 10)}
  images = [{"id": 10 + k, "file_name": n, "width": w, "height": h}
            for k, (n, (w, h)) in enumerate(sizes.items())]
  ids = {im["file_name"]: im["id"] for im in images}
  g = ids["good.jpg"]
  anns = [
      {"id": 1, "image_id": g, "category_id": 1, "bbox": [2, 2, 10, 10]},            # ok
      {"id": 2, "image_id": g, "category_id": 2, "bbox": [30, 20, 20, 20]},          # clipped
      {"id": 3, "image_id": g, "category_id": 1, "bbox": [100, 100, 5, 5]},          # outside
      {"id": 4, "image_id": g, "category_id": 1, "bbox": [5, 5, 0, 4]},              # zero w
      {"id": 5, "image_id": g, "category_id": 1, "bbox": [5, 5, 4, -3]},             # negative h
      {"id": 6, "image_id": g, "category_id": 1, "bbox": [math.nan, 1, 2, 2]},       # NaN
      {"id": 7, "image_id": g, "category_id": 1, "bbox": [1, 1, 1e9, 2]},            # absurd
      {"id": 8, "image_id": g, "category_id": 1, "bbox": [1, 1, math.inf, 2]},       # inf
      {"id": 9, "image_id": g, "category_id": 99, "bbox": [1, 1, 5, 5]},             # unknown cat
      {"id": 1, "image_id": g, "category_id": 2, "bbox": [3, 3, 6, 6], "iscrowd": 1},  # dup id
      {"id": 10, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]},           # unknown img
      {"id": 11, "image_id": ids["mismatch.jpg"], "category_id": 1, "bbox": [35, 25, 10, 10]},
      {"id": 12, "image_id": ids["big.jpg"], "category_id": 2, "bbox": [10, 10, 40, 20],
       "area": 500},
      {"id": 13, "image_id": ids["corrupt.jpg"], "category_id": 1, "bbox": [1, 1, 5, 5]},
      {"id": 14, "image_id": ids["gray.png"], "category_id": 1, "bbox": [1, 1, 5, 5]},
  ]
  # json.dumps writes NaN / Infinity literals, which Python's json (and pycocotools) accept.
  (root / "annotations" / "instances_val.json").write_text(
      json.dumps({"images": images, "annotations": anns, "categories": CATS}))
  return ids


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bad")
  ids = _bad_folder(tmp / "ds")
  records = []
  handler_records = []

  class H(logging.Handler):
    def emit(self, record):
      handler_records.append(record.getMessage())

  h = H(level=logging.WARNING)
  logging.getLogger(cf.__name__).addHandler(h)
  try:
    src = open_source(dict(source="coco_folder", root=str(tmp / "ds"), data_dir=str(tmp / "tfds"),
                           max_image_side=64), "val")
  finally:
    logging.getLogger(cf.__name__).removeHandler(h)
  by_id = {src[i]["image_id"]: src[i] for i in range(len(src))}
  gt = json.loads(Path(src.eval_gt).read_text())
  report = json.loads((Path(src.eval_gt).parent / cf.REPORT_FILE).read_text())
  return dict(src=src, ids=ids, by_id=by_id, gt=gt, report=report, counts=report["counts"],
              log=handler_records, tmp=tmp)


def test_unusable_images_are_skipped_counted_and_named(prepared):
  c, log, ids, by_id = prepared["counts"], prepared["log"], prepared["ids"], prepared["by_id"]
  assert c["image_unreadable"] == 3        # corrupt, truncated, text
  assert c["image_empty"] == 1
  assert c["image_missing"] == 1
  assert c["image_too_small"] == 1
  for name in ("corrupt.jpg", "truncated.jpg", "text.jpg", "empty.jpg", "missing.jpg",
               "tiny.png"):
    assert ids[name] not in by_id
    assert any(name in line for line in log), name
  skipped = {Path(s["file"]).name: s["reason"] for s in prepared["report"]["skipped_images"]}
  assert skipped == {"corrupt.jpg": "image_unreadable", "truncated.jpg": "image_unreadable",
                     "text.jpg": "image_unreadable", "empty.jpg": "image_empty",
                     "missing.jpg": "image_missing", "tiny.png": "image_too_small"}
  assert c["images_in_json"] == 15 and c["images_kept"] == 9 == len(prepared["src"])
  # Skipped images and their annotations are absent from the eval GT too.
  gt_ids = {im["id"] for im in prepared["gt"]["images"]}
  assert gt_ids == set(by_id)
  assert 13 not in {a["id"] for a in prepared["gt"]["annotations"]}


def test_modes_converted_to_8bit_rgb(prepared):
  c, ids, by_id = prepared["counts"], prepared["ids"], prepared["by_id"]
  assert c["image_converted"] == 4
  assert prepared["report"]["converted_modes"] == {"L": 1, "RGBA": 1, "CMYK": 1, "I;16": 1} or \
      prepared["report"]["converted_modes"] == {"L": 1, "RGBA": 1, "CMYK": 1, "I": 1}
  for name in ("gray.png", "rgba.png", "cmyk.jpg", "gray16.png", "plain.bmp"):
    rec = by_id[ids[name]]
    im = Image.open(io.BytesIO(rec["image"]))
    assert im.format in ("JPEG", "PNG") and im.mode == "RGB", name
    assert im.size == (rec["width"], rec["height"])
  arr16 = np.asarray(Image.open(io.BytesIO(by_id[ids["gray16.png"]]["image"])))
  assert np.all(arr16 == 128)                     # 16-bit scaled, not clipped to 255
  assert np.all(np.asarray(Image.open(io.BytesIO(by_id[ids["gray.png"]]["image"]))) == 77)
  cmyk = np.asarray(Image.open(io.BytesIO(by_id[ids["cmyk.jpg"]]["image"]))).astype(int)
  assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60   # CMYK (0,1,1,0) = red
  assert by_id[ids["plain.bmp"]]["image"][:4] == b"\x89PNG"
  # The clean JPEG is stored byte-for-byte.
  assert by_id[ids["good.jpg"]]["image"] == (prepared["tmp"] / "ds/val/good.jpg").read_bytes()


def test_box_policy(prepared):
  c, ids, by_id = prepared["counts"], prepared["ids"], prepared["by_id"]
  assert c["box_clipped"] == 2          # good.jpg ann 2, mismatch.jpg ann 11
  assert c["box_outside"] == 1
  assert c["box_nonpositive"] == 2
  assert c["box_absurd"] == 3           # NaN, 1e9, inf
  assert c["box_unknown_category"] == 1
  assert c["ann_unknown_image"] == 1
  assert any("unknown category id 99" in line for line in prepared["log"])
  rec = by_id[ids["good.jpg"]]
  np.testing.assert_allclose(rec["boxes"], [[2, 2, 12, 12], [30, 20, 40, 30], [3, 3, 9, 9]])
  np.testing.assert_array_equal(rec["classes"], [0, 1, 1])
  np.testing.assert_array_equal(rec["is_crowd"], [False, False, True])


def test_duplicate_annotation_ids_kept_with_fresh_ids(prepared):
  assert prepared["counts"]["ann_duplicate_id"] == 1
  assert any("duplicate annotation id 1" in line for line in prepared["log"])
  good = prepared["ids"]["good.jpg"]
  anns = [a for a in prepared["gt"]["annotations"] if a["image_id"] == good]
  assert len(anns) == 3
  ids = [a["id"] for a in anns]
  assert len(set(ids)) == 3 and 1 in ids and 2 in ids
  fresh = [a for a in anns if a["id"] not in (1, 2)][0]
  assert fresh["iscrowd"] == 1 and fresh["id"] > 14      # max id + 1
  all_ids = [a["id"] for a in prepared["gt"]["annotations"]]
  assert len(all_ids) == len(set(all_ids))


def test_size_mismatch_uses_file_size_and_clips(prepared):
  c, ids, by_id = prepared["counts"], prepared["ids"], prepared["by_id"]
  assert c["image_size_mismatch"] == 1
  assert any("mismatch.jpg" in line and "50x50" in line for line in prepared["log"])
  rec = by_id[ids["mismatch.jpg"]]
  assert (rec["width"], rec["height"]) == (40, 30)
  np.testing.assert_allclose(rec["boxes"], [[35, 25, 40, 30]])
  gt_im = [im for im in prepared["gt"]["images"] if im["id"] == ids["mismatch.jpg"]][0]
  assert (gt_im["width"], gt_im["height"]) == (40, 30)


def test_no_annotations_kept_as_background(prepared):
  c, ids, by_id = prepared["counts"], prepared["ids"], prepared["by_id"]
  # nobox, rgba, cmyk, gray16, plain.bmp have no annotations in the json
  assert c["image_no_annotations"] == 5
  assert by_id[ids["nobox.jpg"]]["boxes"].shape == (0, 4)
  assert ids["nobox.jpg"] in {im["id"] for im in prepared["gt"]["images"]}


def test_large_image_downscaled_with_boxes(prepared):
  c, ids, by_id = prepared["counts"], prepared["ids"], prepared["by_id"]
  assert c["image_downscaled"] == 1
  rec = by_id[ids["big.jpg"]]
  assert (rec["width"], rec["height"]) == (64, 32)
  np.testing.assert_allclose(rec["boxes"], [[6.4, 6.4, 32.0, 19.2]], rtol=1e-5)
  ann = [a for a in prepared["gt"]["annotations"] if a["id"] == 12][0]
  assert ann["bbox"] == pytest.approx([6.4, 6.4, 25.6, 12.8])
  assert ann["area"] == pytest.approx(500 * 0.64 * 0.64)


def test_summary_report_has_every_count(prepared):
  assert set(cf.COUNT_KEYS) <= set(prepared["counts"])
  assert prepared["counts"]["boxes_kept"] == len(prepared["gt"]["annotations"])


# ---------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------

RAW_W, RAW_H = 48, 32
RAW_BOX = (6, 4, 20, 14)   # x1, y1, x2, y2 of a red block in raw pixels


def _exif_jpeg(orientation: int) -> bytes:
  arr = np.full((RAW_H, RAW_W, 3), 230, np.uint8)
  x1, y1, x2, y2 = RAW_BOX
  arr[y1:y2, x1:x2] = (230, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=100, exif=exif)
  return buf.getvalue()


def _red_box(data: bytes):
  arr = np.asarray(Image.open(io.BytesIO(data))).astype(int)
  red = (arr[..., 0] > 150) & (arr[..., 1] < 100)
  ys, xs = np.nonzero(red)
  return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
  """Json size = raw size: orientations 5-8 (which swap the sides) rotate the boxes with the
  image; orientations 1-4 keep the size so the boxes are taken as given (upright)."""
  root = tmp_path / "ds"
  (root / "val").mkdir(parents=True)
  (root / "annotations").mkdir()
  (root / "val" / "r.jpg").write_bytes(_exif_jpeg(orientation))
  x1, y1, x2, y2 = RAW_BOX
  images = [{"id": 1, "file_name": "r.jpg", "width": RAW_W, "height": RAW_H}]
  anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}]
  (root / "annotations" / "instances_val.json").write_text(
      json.dumps({"images": images, "annotations": anns, "categories": CATS}))
  p = cf.prepare_coco_folder(root, "val", tmp_path / "tfds", progress=False)
  rec = p.data_source()[0]
  c = p.counts
  stored = Image.open(io.BytesIO(rec["image"]))
  if orientation >= 5:
    assert stored.size == (RAW_H, RAW_W) == (rec["width"], rec["height"])
    assert c["image_exif_boxes_rotated"] == 1 and c["image_size_mismatch"] == 0
    np.testing.assert_allclose(rec["boxes"][0], _red_box(rec["image"]), atol=1)
  else:
    assert stored.size == (RAW_W, RAW_H)
    assert c["image_exif_boxes_rotated"] == 0 and c["image_size_mismatch"] == 0
    np.testing.assert_allclose(rec["boxes"][0], RAW_BOX)
  assert c["image_exif_rotated"] == (orientation != 1)
  assert stored.getexif().get(0x0112, 1) == 1          # no orientation left to re-apply


def test_exif_upright_json_boxes_used_as_given(tmp_path):
  """Json size = upright size (COCO's convention): boxes are upright coordinates."""
  root = tmp_path / "ds"
  (root / "val").mkdir(parents=True)
  (root / "annotations").mkdir()
  data = _exif_jpeg(6)
  (root / "val" / "r.jpg").write_bytes(data)
  upright = Image.open(io.BytesIO(data))
  from PIL import ImageOps
  buf = io.BytesIO()
  ImageOps.exif_transpose(upright).save(buf, "PNG")
  bx = _red_box(buf.getvalue())
  images = [{"id": 1, "file_name": "r.jpg", "width": RAW_H, "height": RAW_W}]
  anns = [{"id": 1, "image_id": 1, "category_id": 2,
           "bbox": [int(bx[0]), int(bx[1]), int(bx[2] - bx[0]), int(bx[3] - bx[1])]}]
  (root / "annotations" / "instances_val.json").write_text(
      json.dumps({"images": images, "annotations": anns, "categories": CATS}))
  p = cf.prepare_coco_folder(root, "val", tmp_path / "tfds", progress=False)
  rec = p.data_source()[0]
  assert p.counts["image_exif_rotated"] == 1 and p.counts["image_exif_boxes_rotated"] == 0
  np.testing.assert_allclose(rec["boxes"][0], bx)
  np.testing.assert_allclose(rec["boxes"][0], _red_box(rec["image"]), atol=1)


# ---------------------------------------------------------------------------
# fatal json problems
# ---------------------------------------------------------------------------

GOOD = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}],
        "categories": [{"id": 1, "name": "a"}]}


def _mutate(fn):
  d = json.loads(json.dumps(GOOD))
  fn(d)
  return json.dumps(d)


@pytest.mark.parametrize("text, match", [
    ("{not json", "malformed json"),
    ("[1, 2]", "top level must be a JSON object"),
    (_mutate(lambda d: d.pop("annotations")), "missing required top-level key 'annotations'"),
    (_mutate(lambda d: d.pop("categories")), "missing required top-level key 'categories'"),
    (_mutate(lambda d: d["images"][0].pop("file_name")),
     r"images\[0\] \(id 1\) is missing required key 'file_name'"),
    (_mutate(lambda d: d["images"][0].pop("width")), "missing required key 'width'"),
    (_mutate(lambda d: d["annotations"][0].pop("bbox")),
     r"annotations\[0\] \(id 1\) is missing required key 'bbox'"),
    (_mutate(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])), "key 'bbox' must be"),
    (_mutate(lambda d: d["annotations"][0].update(bbox=[1, None, 3, 4])), "key 'bbox' must be"),
    (_mutate(lambda d: d["annotations"][0].pop("category_id")),
     "missing required key 'category_id'"),
    (_mutate(lambda d: d["categories"][0].pop("name")), "missing required key 'name'"),
    (_mutate(lambda d: d["images"].append(dict(d["images"][0]))), "duplicate image id 1"),
    (_mutate(lambda d: d["categories"].append({"id": 1, "name": "x"})),
     "duplicate category id 1"),
])
def test_fatal_json_errors_name_file_and_key(tmp_path, text, match):
  root = tmp_path / "ds"
  (root / "annotations").mkdir(parents=True)
  (root / "val").mkdir()
  _solid(8, 8).save(root / "val" / "a.jpg")
  path = root / "annotations" / "instances_val.json"
  path.write_text(text)
  with pytest.raises(cf.CocoFormatError, match=match) as err:
    cf.prepare_coco_folder(root, "val", tmp_path / "tfds", progress=False)
  assert str(path) in str(err.value)
  assert not (tmp_path / "tfds" / cf.BUILDER_NAME).exists() or not any(
      (tmp_path / "tfds" / cf.BUILDER_NAME).rglob("*.array_record*"))


def test_missing_json_is_fatal(tmp_path):
  (tmp_path / "ds").mkdir()
  with pytest.raises(cf.CocoFormatError, match="instances_val.json: annotation json not found"):
    cf.prepare_coco_folder(tmp_path / "ds", "val", tmp_path / "tfds", progress=False)


def test_progress_lines(tmp_path, capsys):
  root = tmp_path / "ds"
  (root / "val").mkdir(parents=True)
  (root / "annotations").mkdir()
  images = []
  for k in range(5):
    _solid(8, 8).save(root / "val" / f"{k}.jpg")
    images.append({"id": k, "file_name": f"{k}.jpg", "width": 8, "height": 8})
  (root / "annotations" / "instances_val.json").write_text(
      json.dumps({"images": images, "annotations": [], "categories": CATS}))
  cf.prepare_coco_folder(root, "val", tmp_path / "tfds", progress_every=2)
  out = capsys.readouterr().out
  assert "val: 2/5 images (40.0%)" in out and "val: 4/5 images" in out
  assert "image_no_annotations         5" in out
