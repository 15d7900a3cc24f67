"""Pascal VOC and YOLO (ultralytics) folders → COCO folders that prepare, with the boxes in the right pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from asff_jax.data import coco_folder, convert_dataset
from asff_jax.errors import DataError, MissingFileError

COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "person": (40, 40, 200)}


def _image(path: Path, w: int, h: int, boxes):
  """A noisy photo-like image with each xyxy box drawn filled in its class colour."""
  rng = np.random.default_rng(len(path.name) + w)
  img = Image.fromarray(rng.integers(60, 200, (h, w, 3), np.uint8))
  draw = ImageDraw.Draw(img)
  for name, (x1, y1, x2, y2) in boxes:
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=COLOURS[name])
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path)


# image: (size, [(class, xyxy in continuous pixels, difficult)])
VOC_IMAGES = {
    "000001": ((320, 240), [("cat", (10, 20, 110, 140), False), ("dog", (150, 30, 300, 200), False)]),
    "000002": ((200, 300), [("person", (20, 40, 120, 290), False), ("cat", (130, 10, 190, 70), True)]),
    "000003": ((256, 256), [("dog", (0, 0, 256, 128), False), ("person", (60, 140, 100, 250), False),
                            ("cat", (150, 150, 250, 250), False)]),
}


def _voc(tmp_path) -> Path:
  root = tmp_path / "VOC2007"
  for stem, ((w, h), objs) in VOC_IMAGES.items():
    _image(root / "JPEGImages" / f"{stem}.jpg", w, h, [(n, b) for n, b, _ in objs])
    xml = [f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height>"
           "<depth>3</depth></size>"]
    for name, (x1, y1, x2, y2), difficult in objs:  # VOC: 1-based inclusive corners
      xml.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox>"
                 f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                 "</bndbox></object>")
    if stem == "000003":
      xml.append("<object><name>dog</name><bndbox><xmin>5</xmin></bndbox></object>")  # malformed
      xml.append("<object><name>horse</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>50</xmax>"
                 "<ymax>50</ymax></bndbox></object>")  # not in --classes
    xml.append("</annotation>")
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{stem}.xml").write_text("".join(xml))
  (root / "Annotations" / "000004.xml").write_text("<annotation><object>")  # truncated
  (root / "Annotations" / "000005.xml").write_text(  # its image is missing
      "<annotation><filename>000005.jpg</filename><object><name>cat</name><bndbox><xmin>1</xmin>"
      "<ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
  sets = root / "ImageSets" / "Main"
  sets.mkdir(parents=True)
  (sets / "train.txt").write_text("000001\n000003\n000004\n000005\n")
  (sets / "val.txt").write_text("000002\n")
  return root


def _prepared_boxes(out: Path, split: str, tmp_path) -> dict:
  """file name -> (sorted rows of (class name, x1, y1, x2, y2, crowd)) from the prepared records."""
  prepared = coco_folder.prepare_coco_folder(out, split, tmp_path / "tfds", progress=False)
  names = [c["name"] for c in prepared.report["categories"]]
  rows = {}
  for rec in prepared.data_source():
    boxes = np.asarray(rec["boxes"]).reshape(-1, 4)
    rows[Path(str(rec["file_name"], "utf-8") if isinstance(rec["file_name"], bytes)
              else rec["file_name"]).name] = sorted(
        (names[int(c)], *np.round(b, 3).tolist(), bool(k))
        for b, c, k in zip(boxes, rec["classes"], rec["is_crowd"]))
  return rows, prepared


def test_voc_to_coco_folder_prepares_with_the_same_boxes(tmp_path, capsys):
  src = _voc(tmp_path)
  out = tmp_path / "coco"
  code = convert_dataset.main(["--from=voc", f"--src={src}", f"--out={out}", "--classes=cat,dog,person"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "train      2 images, 5 boxes" in printed and "val        1 images, 2 boxes" in printed
  assert "--config.dataset.train_split=train --config.dataset.eval_split=val" in printed
  report = json.loads((out / convert_dataset.REPORT_FILE).read_text())
  assert report["counts"] == {"xml_malformed": 1, "image_missing": 1, "box_malformed": 1,
                              "box_unknown_class": 1, "box_difficult": 1}
  data = json.loads((out / "annotations" / "instances_train.json").read_text())
  assert data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "person"}]
  for split, stems in (("train", ("000001", "000003")), ("val", ("000002",))):
    rows, prepared = _prepared_boxes(out, split, tmp_path)
    assert prepared.report["counts"]["images_kept"] == len(stems)
    assert not prepared.report["counts"].get("image_missing")
    for stem in stems:
      (w, h), objs = VOC_IMAGES[stem]
      want = sorted((n, *map(float, b), d) for n, b, d in objs)
      assert rows[f"{stem}.jpg"] == want, stem
  # the difficult cat is an ignore region in the evaluation GT
  gt = json.loads(Path(prepared.gt_path).read_text())
  assert [a["iscrowd"] for a in gt["annotations"] if a["category_id"] == 1] == [1]
  # images are links to the source, not copies
  assert (out / "train" / "000001.jpg").is_symlink()


def _yolo(tmp_path) -> Path:
  root = tmp_path / "yolo"
  names = ["person", "cat", "dog"]
  images = {  # split -> {file: ((w, h), [(class index, xyxy)])}
      "train": {"a.jpg": ((320, 240), [(1, (32, 24, 160, 120)), (2, (200, 100, 300, 220))]),
                "b.png": ((160, 200), [(0, (10, 20, 90, 180))]),
                "c.jpg": ((256, 192), [])},  # no label file: background image
      "val": {"d.jpg": ((300, 300), [(2, (30, 60, 270, 150)), (0, (100, 160, 160, 290)), (1, (0, 0, 60, 60))])},
  }
  for split, files in images.items():
    for fname, ((w, h), objs) in files.items():
      _image(root / "images" / split / fname, w, h, [(names[k], b) for k, b in objs])
      if fname == "c.jpg":
        continue
      lines = [f"{k} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
               for k, (x1, y1, x2, y2) in objs]
      if fname == "a.jpg":
        lines += ["7 0.5 0.5 0.1 0.1", "1 0.5 0.5", "oops"]  # unknown class, too short, not a number
      if fname == "d.jpg":  # the last box as a polygon (ultralytics segment line)
        k, (x1, y1, x2, y2) = objs[-1]
        lines[-1] = f"{k} {x1 / w} {y1 / h} {x2 / w} {y1 / h} {x2 / w} {y2 / h} {x1 / w} {y2 / h}"
      (root / "labels" / split).mkdir(parents=True, exist_ok=True)
      (root / "labels" / split / Path(fname).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
  (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"
                                  "names:\n  0: person\n  1: cat\n  2: dog\n")
  return root, images, names


def test_yolo_to_coco_folder_prepares_with_the_same_boxes(tmp_path, capsys):
  src, images, names = _yolo(tmp_path)
  out = tmp_path / "coco"
  assert convert_dataset.main(["--from=yolo", f"--src={src}", f"--out={out}", "--copy"]) == 0
  printed = capsys.readouterr().out
  assert "train      3 images, 3 boxes" in printed and "val        1 images, 3 boxes" in printed
  report = json.loads((out / convert_dataset.REPORT_FILE).read_text())
  assert report["counts"] == {"image_no_labels": 1, "box_unknown_class": 1, "box_malformed": 2,
                              "box_from_polygon": 1}
  assert report["categories"] == [{"id": i, "name": n} for i, n in enumerate(names)]
  assert not (out / "train" / "a.jpg").is_symlink()  # --copy
  for split, files in images.items():
    rows, prepared = _prepared_boxes(out, split, tmp_path)
    assert prepared.report["counts"]["images_kept"] == len(files)
    for fname, (_, objs) in files.items():
      want = sorted((names[k], *map(float, b), False) for k, b in objs)
      got = rows[fname]
      assert [r[0] for r in got] == [r[0] for r in want], fname
      np.testing.assert_allclose([r[1:5] for r in got], [r[1:5] for r in want], atol=2e-3) if want else None


def test_conversion_mistakes_end_in_one_line(tmp_path, capsys):
  def one_line(argv, match):
    assert convert_dataset.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and match in err, err

  one_line(["--from=voc", f"--src={tmp_path / 'nope'}", f"--out={tmp_path / 'o'}"], "Annotations: not found")
  src = _voc(tmp_path)
  one_line(["--from=voc", f"--src={src}", f"--out={tmp_path / 'o'}", "--splits=test"], "test.txt: not found")
  (tmp_path / "y" / "images" / "train").mkdir(parents=True)
  one_line(["--from=yolo", f"--src={tmp_path / 'y'}", f"--out={tmp_path / 'o'}"], "no class names")
  (tmp_path / "y" / "data.yaml").write_text("train: [unclosed\n")
  one_line(["--from=yolo", f"--src={tmp_path / 'y'}", f"--out={tmp_path / 'o'}"], "not valid YAML")
  with pytest.raises(MissingFileError):
    convert_dataset.convert_yolo(tmp_path / "missing", tmp_path / "o")
  (tmp_path / "y" / "data.yaml").write_text("train: images/train\n")
  with pytest.raises(DataError, match="no 'names'"):
    convert_dataset.convert_yolo(tmp_path / "y", tmp_path / "o")
