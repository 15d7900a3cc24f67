"""Tests of asff_jax.evaluation.coco_eval (spec §5, official ``utils/cocoapi_evaluator.py``).

Hand-made ground truths whose COCO metrics are known in advance. Expected AP
values are derived by hand / from first principles (101-point interpolated
precision, exact fractions), never by calling pycocotools.
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

try:
  import asff_jax  # noqa: F401
except ImportError:  # running pytest without the package installed
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pycocotools.coco import COCO

from asff_jax.evaluation.coco_eval import STAT_NAMES, CocoEvaluator, evaluate_fixed_outputs, load_coco_gt

CATS = (7, 1, 3)  # deliberately unsorted and non-contiguous


def make_gt(images, anns, cats=CATS):
  """images: [(id, w, h)]; anns: [(image_id, cat_id, [x, y, w, h], iscrowd)]."""
  return {
      "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, w, h in images],
      "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in cats],
      "annotations": [{
          "id": k + 1,
          "image_id": im,
          "category_id": c,
          "bbox": list(map(float, bb)),
          "area": float(bb[2] * bb[3]),
          "iscrowd": crowd,
      } for k, (im, c, bb, crowd) in enumerate(anns)],
  }


def xywh_to_xyxy(bb):
  x, y, w, h = bb
  return [x, y, x + w, y + h]


def ap_101_point(tp_flags, n_gt):
  """COCO 101-point interpolated AP from first principles (exact fractions).

  tp_flags: detections in descending score order, True = true positive.
  Precision is made monotone from the right (envelope); for each recall level
  r = k/100 the precision is the envelope at the first rank reaching recall r,
  0 if none does; AP is the mean over the 101 levels.
  """
  tp = fp = 0
  rec, prec = [], []
  for f in tp_flags:
    tp, fp = tp + bool(f), fp + (not f)
    rec.append(Fraction(tp, n_gt))
    prec.append(Fraction(tp, tp + fp))
  env = prec[:]
  for i in range(len(env) - 2, -1, -1):
    env[i] = max(env[i], env[i + 1])
  total = Fraction(0)
  for k in range(101):
    r = Fraction(k, 100)
    hit = [i for i, rv in enumerate(rec) if rv >= r]
    total += env[hit[0]] if hit else 0
  return total / 101


IMAGES = [(1, 640, 480), (2, 320, 240)]
# small (< 32^2), medium, large GT boxes over both images and all 3 categories
GT_ANNS = [
    (1, 1, [10, 20, 20, 25], 0),  # small, area 500
    (1, 3, [100, 120, 60, 50], 0),  # medium
    (1, 7, [300, 150, 200, 180], 0),  # large
    (2, 7, [5, 5, 40, 40], 0),  # medium
    (2, 1, [150, 60, 120, 150], 0),  # large
]


def test_perfect_detections_give_ap_one():
  ev = CocoEvaluator(make_gt(IMAGES, GT_ANNS))
  assert ev.class_ids == [1, 3, 7] and ev.label_to_cat == {0: 1, 1: 3, 2: 7}
  for im, w, h in IMAGES:
    anns = [a for a in GT_ANNS if a[0] == im]
    boxes = [xywh_to_xyxy(a[2]) for a in anns]
    labels = [ev.class_ids.index(a[1]) for a in anns]
    ev.add(im, boxes, np.linspace(0.9, 0.5, len(anns)), labels, input_hw=(h, w))
  m = ev.evaluate()
  assert set(m) == set(STAT_NAMES)
  for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
    assert m[k] == pytest.approx(1.0), (k, m)


def test_single_gt_known_iou():
  # GT 100x100; detection 100x72 sharing the top-left corner: IoU = 7200/10000
  # = 0.72 -> a TP at IoU thresholds 0.50, 0.55, 0.60, 0.65, 0.70 (5 of 10),
  # a miss + FP at 0.75 ... 0.95. Each threshold's AP is 1 (single TP at rank 1)
  # or 0, so AP = 5/10, AP50 = 1, AP75 = 0, AR100 = 5/10.
  gt = make_gt([(1, 200, 200)], [(1, 3, [10, 10, 100, 100], 0)])
  ev = CocoEvaluator(gt)
  ev.add(1, [[10, 10, 110, 82]], [0.8], [1], input_hw=(200, 200))
  m = ev.evaluate()
  assert m["AP50"] == pytest.approx(1.0)
  assert m["AP75"] == pytest.approx(0.0)
  assert m["AP"] == pytest.approx(0.5)
  assert m["AR100"] == pytest.approx(0.5)


def test_false_positive_above_true_positive():
  # 4 GTs (cat 3); ranked detections TP, FP, TP, FP, TP; one GT is missed.
  # recall    1/4  1/4  2/4  2/4  3/4
  # precision 1    1/2  2/3  1/2  3/5   -> envelope 1, 2/3, 2/3, 3/5, 3/5
  # 101 recall points: k = 0..25 -> 1 (26 pts), 26..50 -> 2/3 (25), 51..75 -> 3/5
  # (25), 76..100 -> 0 (25): AP = (26 + 25*2/3 + 25*3/5) / 101.
  gts = [[10, 10, 40, 40], [100, 10, 40, 40], [10, 100, 40, 40], [100, 100, 40, 40]]
  gt = make_gt([(5, 300, 300)], [(5, 3, bb, 0) for bb in gts])
  ev = CocoEvaluator(gt)
  fp1, fp2 = [200, 200, 230, 230], [240, 10, 290, 60]  # disjoint from every GT
  dets = [xywh_to_xyxy(gts[0]), fp1, xywh_to_xyxy(gts[1]), fp2, xywh_to_xyxy(gts[2])]
  ev.add(5, dets, [0.9, 0.8, 0.7, 0.6, 0.5], [1] * 5, input_hw=300)
  m = ev.evaluate()
  hand = (26 + Fraction(25 * 2, 3) + Fraction(25 * 3, 5)) / 101
  assert ap_101_point([1, 0, 1, 0, 1], 4) == hand
  # every TP has IoU 1 and every FP IoU 0, so each IoU threshold gives the same AP
  for k in ("AP", "AP50", "AP75"):
    assert m[k] == pytest.approx(float(hand), abs=1e-12), (k, m[k], float(hand))
  assert m["AR100"] == pytest.approx(0.75)


def test_category_id_remapping_noncontiguous():
  gt = make_gt([(1, 100, 100)], [(1, 7, [10, 10, 50, 50], 0)], cats=(7, 1, 3))
  ev = CocoEvaluator(gt)
  assert ev.class_ids == [1, 3, 7]
  ev.add(1, [[10, 10, 60, 60]], [0.9], [2], input_hw=100)  # label 2 -> category 7
  assert ev.results()[0]["category_id"] == 7
  assert ev.evaluate()["AP"] == pytest.approx(1.0)
  # label 1 -> category 3, which has no GT: category 7 gets no detection -> AP 0
  ev2 = CocoEvaluator(gt)
  ev2.add(1, [[10, 10, 60, 60]], [0.9], [1], input_hw=100)
  assert ev2.results()[0]["category_id"] == 3
  assert ev2.evaluate()["AP"] == pytest.approx(0.0)
  with pytest.raises(ValueError):
    ev2.add(1, [[10, 10, 60, 60]], [0.9], [3], input_hw=100)


def test_rescale_input_to_original_size():
  # 640 wide x 480 high image, plain resize to a 416 square input:
  # x scales by 416/640 = 0.65, y by 416/480.
  gt_box = [64, 48, 320, 240]  # xywh in original pixels
  gt = make_gt([(3, 640, 480)], [(3, 1, gt_box, 0)])
  x1, y1, x2, y2 = xywh_to_xyxy(gt_box)
  sx, sy = 416 / 640, 416 / 480
  det_in = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]  # [41.6, 41.6, 249.6, 249.6]
  np.testing.assert_allclose(det_in, [41.6, 41.6, 249.6, 249.6])

  ev = CocoEvaluator(gt)
  ev.add(3, [det_in], [0.9], [0], input_hw=416)  # original size read from the GT
  np.testing.assert_allclose(ev.results()[0]["bbox"], gt_box, rtol=1e-6)
  assert ev.evaluate()["AP"] == pytest.approx(1.0)

  ev_explicit = CocoEvaluator(gt)
  ev_explicit.add(3, [det_in], [0.9], [0], input_hw=(416, 416), orig_hw=(480, 640))
  np.testing.assert_allclose(ev_explicit.results()[0]["bbox"], gt_box, rtol=1e-6)

  # non-square input (h, w) = (320, 416)
  ev_rect = CocoEvaluator(gt)
  det_rect = [x1 * 416 / 640, y1 * 320 / 480, x2 * 416 / 640, y2 * 320 / 480]
  ev_rect.add(3, [det_rect], [0.9], [0], input_hw=(320, 416))
  np.testing.assert_allclose(ev_rect.results()[0]["bbox"], gt_box, rtol=1e-6)

  # without rescaling the same box is badly placed: AP drops
  ev_bad = CocoEvaluator(gt)
  ev_bad.add(3, [det_in], [0.9], [0], input_hw=416, orig_hw=416)
  assert ev_bad.evaluate()["AP"] < 0.5


def test_crowd_gt_is_an_ignore_region():
  normal = [20, 20, 50, 50]
  crowd = [120, 20, 150, 150]
  det_normal = xywh_to_xyxy(normal)
  det_in_crowd = [150, 50, 200, 100]  # entirely inside the crowd region
  # crowd=1: the crowd GT is not a missed GT, and a detection inside it (even
  # ranked first) is ignored, not a false positive -> AP 1, AR 1.
  ev = CocoEvaluator(make_gt([(9, 300, 300)], [(9, 1, normal, 0), (9, 1, crowd, 1)]))
  ev.add(9, [det_in_crowd, det_normal], [0.95, 0.9], [0, 0], input_hw=300)
  m = ev.evaluate()
  assert m["AP"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)
  # only the normal GT detected
  ev1 = CocoEvaluator(make_gt([(9, 300, 300)], [(9, 1, normal, 0), (9, 1, crowd, 1)]))
  ev1.add(9, [det_normal], [0.9], [0], input_hw=300)
  assert ev1.evaluate()["AP"] == pytest.approx(1.0)
  # control: the same box as an ordinary GT is a missed GT. One TP at rank 1
  # with 2 GTs: recall 1/2 at precision 1 -> AP = 51/101 (k = 0..50).
  ev0 = CocoEvaluator(make_gt([(9, 300, 300)], [(9, 1, normal, 0), (9, 1, crowd, 0)]))
  ev0.add(9, [det_normal], [0.9], [0], input_hw=300)
  assert ev0.evaluate()["AP"] == pytest.approx(float(ap_101_point([1], 2)))
  assert float(ap_101_point([1], 2)) == pytest.approx(51 / 101)


def test_results_json_written_and_readable(tmp_path):
  gt = make_gt(IMAGES, GT_ANNS)
  ev = CocoEvaluator(gt)
  ev.add(1, [[10, 20, 30, 45], [0, 0, 5, 5]], [0.9, 0.1], [0, 2], input_hw=(480, 640))
  path = ev.write_results(tmp_path / "sub" / "results.json")
  with open(path) as f:
    res = json.load(f)
  assert res == ev.results()
  assert res[0] == {"image_id": 1, "category_id": 1, "bbox": [10.0, 20.0, 20.0, 25.0], "score": 0.9}
  assert res[1]["category_id"] == 7
  coco_gt = load_coco_gt(gt)
  dt = coco_gt.loadRes(str(path))
  assert len(dt.getAnnIds()) == 2


def test_empty_detections_return_zeros():
  ev = CocoEvaluator(make_gt(IMAGES, GT_ANNS))
  assert ev.evaluate() == {k: 0.0 for k in STAT_NAMES}  # nothing added at all
  ev.add(1, np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,)), input_hw=416)
  assert ev.image_ids == [1]
  assert ev.evaluate() == {k: 0.0 for k in STAT_NAMES}


def test_gt_sources_and_defaults(tmp_path):
  gt = make_gt([(1, 200, 200)], [(1, 3, [10, 10, 100, 100], 0)])
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(gt))
  coco = load_coco_gt(gt)
  for src in (gt, str(path), path, coco):
    ev = CocoEvaluator(src)
    ev.add(1, [[10, 10, 110, 82]], [0.8], [1], input_hw=200)
    assert ev.evaluate()["AP"] == pytest.approx(0.5)
  assert CocoEvaluator(coco).coco is coco
  # a minimal dict without iscrowd / area / id is completed (and not mutated)
  bare = {"images": gt["images"], "categories": gt["categories"],
          "annotations": [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 100]}]}
  ev = CocoEvaluator(bare)
  ann = ev.coco.loadAnns(ev.coco.getAnnIds())[0]
  assert ann["iscrowd"] == 0 and ann["area"] == 10000 and ann["id"] == 1
  assert "iscrowd" not in bare["annotations"][0]


def test_evaluate_fixed_outputs_helper():
  # hand-made nms_fixed-style batch: padding rows hold junk that must be ignored
  gt = make_gt(IMAGES, GT_ANNS)
  class_ids = [1, 3, 7]
  d = 6
  boxes = np.full((2, d, 4), 7.0, np.float32)
  scores = np.full((2, d), 0.99, np.float32)
  classes = np.zeros((2, d), np.int32)
  num_valid = np.zeros(2, np.int32)
  for b, (im, w, h) in enumerate(IMAGES):
    anns = [a for a in GT_ANNS if a[0] == im]
    for j, a in enumerate(anns):
      x1, y1, x2, y2 = xywh_to_xyxy(a[2])
      boxes[b, j] = [x1 * 416 / w, y1 * 416 / h, x2 * 416 / w, y2 * 416 / h]
      scores[b, j] = 0.9 - 0.1 * j
      classes[b, j] = class_ids.index(a[1])
    num_valid[b] = len(anns)
  out = dict(boxes=boxes, scores=scores, classes=classes, num_valid=num_valid)
  m = evaluate_fixed_outputs(gt, out, [1, 2], input_hw=416)
  assert m["AP"] == pytest.approx(1.0)
  # a list of single-image batches and a results json
  outs = [{k: v[i:i + 1] for k, v in out.items()} for i in range(2)]
  m2 = evaluate_fixed_outputs(gt, outs, [1, 2], input_hw=416,
                              orig_hws=[(480, 640), (240, 320)])
  assert m2["AP"] == pytest.approx(1.0)


def test_end_to_end_with_nms_fixed():
  """GT -> synthetic decoded predictions (+ duplicates and noise) -> nms_fixed -> AP 1."""
  from asff_jax.evaluation.postprocess import nms_fixed

  gt = make_gt(IMAGES, GT_ANNS)
  class_ids = [1, 3, 7]
  n, c = 32, 3
  pred = np.zeros((2, n, 5 + c), np.float32)
  pred[..., 4] = 0.0005  # background rows: below conf 0.001
  for b, (im, w, h) in enumerate(IMAGES):
    anns = [a for a in GT_ANNS if a[0] == im]
    row = 0
    for j, a in enumerate(anns):
      x, y, bw, bh = a[2]
      box = [(x + bw / 2) * 416 / w, (y + bh / 2) * 416 / h, bw * 416 / w, bh * 416 / h]
      for dup, shift in enumerate((0.0, 1.0, -1.0)):  # near-duplicates NMS must remove
        pred[b, row, :4] = box[0] + shift, box[1], box[2], box[3]
        pred[b, row, 4] = 0.9 - 0.1 * dup
        pred[b, row, 5 + class_ids.index(a[1])] = 0.9
        row += 1
  out = nms_fixed(pred, conf_thre=0.001, nms_thre=0.65, pre_nms_topk=n, max_detections=100)
  assert list(np.asarray(out["num_valid"])) == [3, 2]
  m = evaluate_fixed_outputs(gt, out, [1, 2], input_hw=416)
  assert m["AP"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)


def test_class_agnostic_ignores_wrong_labels_and_results_json_round_trip(tmp_path):
  # Perfect boxes, every label shifted to another category: class-aware AP 0,
  # class-agnostic (pycocotools useCats=0) AP 1; reading the written results
  # json back gives the same numbers, and a broken json is refused by name.
  ev = CocoEvaluator(make_gt(IMAGES, GT_ANNS))
  for im, w, h in IMAGES:
    anns = [a for a in GT_ANNS if a[0] == im]
    wrong = [(ev.class_ids.index(a[1]) + 1) % 3 for a in anns]
    ev.add(im, [xywh_to_xyxy(a[2]) for a in anns], np.linspace(0.9, 0.5, len(anns)), wrong,
           input_hw=(h, w))
  aware, agnostic = ev.evaluate(), ev.evaluate(class_agnostic=True)
  assert aware["AP50"] == pytest.approx(0.0) and aware["AP"] == pytest.approx(0.0)
  for k in ("AP", "AP50", "AP75", "AR100"):
    assert agnostic[k] == pytest.approx(1.0), (k, agnostic)
  path = ev.write_results(tmp_path / "res.json")
  again = CocoEvaluator(make_gt(IMAGES, GT_ANNS))
  again.add_results_json(path)
  assert again.evaluate() == aware
  assert again.evaluate(class_agnostic=True) == agnostic
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
  with pytest.raises(ValueError, match="bad.json.*image 99"):
    CocoEvaluator(make_gt(IMAGES, GT_ANNS)).add_results_json(bad)


def test_per_class_ap_table():
  """Class 7 found perfectly (AP 1), class 1 only by a false positive (AP 0), class 3 without GT (-1)."""
  gt = make_gt([(1, 100, 100), (2, 100, 100)],
               [(1, 7, [10, 10, 20, 20], 0), (2, 7, [50, 50, 30, 30], 0), (2, 1, [5, 5, 10, 10], 0)])
  ev = CocoEvaluator(gt)
  label = ev.class_ids.index  # contiguous labels follow the sorted category ids
  ev.add(1, np.array([xywh_to_xyxy([10, 10, 20, 20])]), np.array([0.9]), np.array([label(7)]),
         input_hw=(100, 100))
  ev.add(2, np.array([xywh_to_xyxy([50, 50, 30, 30]), [60, 0, 90, 20]]), np.array([0.8, 0.7]),
         np.array([label(7), label(1)]), input_hw=(100, 100))
  summary = ev.evaluate()
  table = {r["category_id"]: r for r in ev.per_class()}
  assert [r["category_id"] for r in ev.per_class()] == sorted(CATS)
  assert table[7]["AP"] == pytest.approx(1.0) and table[7]["AP50"] == pytest.approx(1.0)
  assert table[1]["AP"] == 0.0 and table[1]["AP50"] == 0.0
  assert table[3]["AP"] == -1.0 and table[3]["num_gt"] == 0
  assert (table[7]["num_gt"], table[1]["num_gt"], table[7]["name"]) == (2, 1, "c7")
  # the summary AP is the mean over the categories with ground truth
  assert summary["AP"] == pytest.approx(0.5) == pytest.approx(np.mean([table[7]["AP"], table[1]["AP"]]))
  ev.evaluate(class_agnostic=True)
  assert ev.per_class() == []
