"""Tests of the box-aware augmentation ops (asff_jax.data.transforms, spec §7-§8).

Every op is checked eagerly and inside ``tf.data`` (same seed -> same result),
plus geometric invariants: boxes stay inside the image, flip twice is the
identity, expand/affine keep box and content aligned, the crop keeps only
centre-inside boxes, identity affine, per-seed determinism, mixup weights,
label padding and the small-box fallback.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from asff_jax.boxes import rescale_boxes
from asff_jax.data import transforms as T

K = 8  # static box capacity used in these tests
H, W = 60, 80
RECT = (20, 10, 50, 40)  # x1, y1, x2, y2 of a filled rectangle (integer pixels)
RECT_RGB = (250, 5, 5)


def _image(seed=0, h=H, w=W, rect=RECT):
  """Smooth uint8 image with one saturated red rectangle (its box is ``rect``)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([xx * 100 // w, yy * 100 // h + 50, 60 + (xx + yy) % 40], -1)
  img = (img + rng.integers(0, 20, img.shape)).astype(np.uint8)
  x1, y1, x2, y2 = rect
  img[y1:y2, x1:x2] = RECT_RGB
  return img


def _boxes(rects=(RECT, (5, 5, 15, 20), (60, 30, 78, 58))):
  boxes = np.zeros((K, 4), np.float32)
  boxes[:len(rects)] = rects
  valid = np.arange(K) < len(rects)
  return boxes, valid


CLASSES = np.arange(K, dtype=np.int32)
WEIGHTS = np.ones(K, np.float32)


def _seed(i):
  return tf.constant([i, 12345], tf.int32)


# Each op as a function (image, boxes, valid, seed) -> tuple of tensors.
OPS = {
    "photometric": lambda im, b, v, s: (T.photometric_distort(im, s),),
    "expand": lambda im, b, v, s: T.random_expand(im, b, s, p=1.0),
    "crop": lambda im, b, v, s: T.random_ssd_crop(im, b, v, s),
    "flip": lambda im, b, v, s: T.random_flip(im, b, s, p=1.0),
    "affine": lambda im, b, v, s: T.random_affine(im, b, s, p=1.0),
    "resize": lambda im, b, v, s: T.random_resize(im, b, 64, s),
    "normalize": lambda im, b, v, s: (T.normalize(im),),
    "mixup": lambda im, b, v, s: T.mixup(im, b, CLASSES, v, im[:40, :50], b, CLASSES, v, s),
    "train": lambda im, b, v, s: T.train_transform(im, b, CLASSES, WEIGHTS, v, s, 64, max_boxes=6),
    "val": lambda im, b, v, s: (T.val_transform(im, 64),),
    "labels": lambda im, b, v, s: (T.to_labels(b, CLASSES, WEIGHTS, v, 5),),
}


def _np(outs):
  return [np.asarray(o) for o in outs]


@pytest.mark.parametrize("name", sorted(OPS))
def test_eager_equals_tf_data(name):
  """Same seed -> same result eagerly and inside Dataset.map (graph mode)."""
  fn = OPS[name]
  img = _image()
  boxes, valid = _boxes()
  seeds = [3, 8]
  eager = [_np(fn(tf.constant(img), boxes, valid, _seed(i))) for i in seeds]
  ds = tf.data.Dataset.from_tensor_slices(tf.constant([[i, 12345] for i in seeds], tf.int32))
  ds = ds.map(lambda s: fn(tf.constant(img), tf.constant(boxes), tf.constant(valid), s))
  graph = [_np(out) for out in ds.as_numpy_iterator()]
  for e, g in zip(eager, graph):
    for a, b in zip(e, g):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=1e-3)


@pytest.mark.parametrize("name", ["photometric", "expand", "crop", "affine", "resize", "mixup",
                                  "train"])
def test_deterministic_per_seed_and_seeds_differ(name):
  fn = OPS[name]
  img, (boxes, valid) = tf.constant(_image()), _boxes()
  a = _np(fn(img, boxes, valid, _seed(1)))
  b = _np(fn(img, boxes, valid, _seed(1)))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  others = [_np(fn(img, boxes, valid, _seed(i))) for i in range(2, 8)]
  differs = [any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, o))
             for o in others]
  assert any(differs)


def _inside(boxes, valid, h, w, tol=1e-3):
  b = np.asarray(boxes)[np.asarray(valid)]
  return (b[:, 0] >= -tol).all() and (b[:, 1] >= -tol).all() and (b[:, 2] <= w + tol).all() \
      and (b[:, 3] <= h + tol).all()


def test_boxes_stay_inside_image():
  img, (boxes, valid) = tf.constant(_image()), _boxes()
  for i in range(12):
    out, b = T.random_expand(img, boxes, _seed(i), p=1.0)
    assert _inside(b, valid, *out.shape[:2])
    out, b, v = T.random_ssd_crop(img, boxes, valid, _seed(i))
    assert _inside(b, v, *out.shape[:2])
    out, b = T.random_affine(img, boxes, _seed(i), p=1.0)
    assert _inside(b, valid, *out.shape[:2])
    out, lab = T.train_transform(img, boxes, CLASSES, WEIGHTS, valid, _seed(i), 64)
    lab = np.asarray(lab)
    n = int((lab[:, :5].sum(-1) > 0).sum())
    cx, cy, w, h = lab[:n, 1], lab[:n, 2], lab[:n, 3], lab[:n, 4]
    assert (cx - w / 2 >= -1e-3).all() and (cx + w / 2 <= 64 + 1e-3).all()
    assert (cy - h / 2 >= -1e-3).all() and (cy + h / 2 <= 64 + 1e-3).all()
    assert out.shape == (64, 64, 3)


def test_flip_twice_is_identity():
  img, (boxes, _) = tf.constant(_image(), tf.float32), _boxes()
  once_img, once_boxes = T.hflip(img, boxes)
  twice_img, twice_boxes = T.hflip(once_img, once_boxes)
  np.testing.assert_array_equal(twice_img, img)
  np.testing.assert_allclose(twice_boxes, boxes)
  # and the flipped box still covers the (flipped) rectangle exactly
  x1, y1, x2, y2 = np.asarray(once_boxes[0]).astype(int)
  np.testing.assert_array_equal(np.asarray(once_img)[y1:y2, x1:x2], np.broadcast_to(RECT_RGB, (y2 - y1, x2 - x1, 3)))


def _rect_mask(img):
  img = np.asarray(img)
  return (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)


def test_expand_keeps_box_content_aligned():
  img, (boxes, _) = _image(), _boxes()
  applied = 0
  for i in range(10):
    out, b = T.random_expand(tf.constant(img), boxes, _seed(i), p=1.0)
    out = np.asarray(out)
    x1, y1, x2, y2 = np.asarray(b[0]).astype(int)
    np.testing.assert_allclose(b[0] - boxes[0], [b[0, 0] - boxes[0, 0], b[0, 1] - boxes[0, 1]] * 2)
    np.testing.assert_array_equal(out[y1:y2, x1:x2], np.broadcast_to(RECT_RGB, (y2 - y1, x2 - x1, 3)))
    assert _rect_mask(out).sum() == (y2 - y1) * (x2 - x1)  # nothing red outside the box
    if out.shape[:2] != img.shape[:2]:
      applied += 1
      assert out.shape[0] >= H and out.shape[1] >= W
  assert applied >= 5
  # p = 0 is the identity
  out, b = T.random_expand(tf.constant(img), boxes, _seed(0), p=0.0)
  np.testing.assert_array_equal(out, img.astype(np.float32))
  np.testing.assert_array_equal(b, boxes)


def test_expand_fill_is_mean():
  img = _image()
  out = np.asarray(T.extract_window(tf.constant(img, tf.float32), [0, 0, W + 10, H + 10], (10, 10)))
  np.testing.assert_allclose(out[0, 0], T.FILL_RGB, rtol=1e-6)
  np.testing.assert_array_equal(out[10:, 10:], img)
  out8 = np.asarray(T.extract_window(tf.constant(img), [-3, -2, 5, 6], (0, 0)))
  assert out8.dtype == np.uint8 and out8.shape == (8, 8, 3)
  np.testing.assert_array_equal(out8[0, 0], [123, 116, 103])
  np.testing.assert_array_equal(out8[2:, 3:], img[:6, :5])


def test_crop_keeps_only_centre_inside_boxes():
  img, (boxes, valid) = _image(), _boxes()
  applied = 0
  for i in range(30):
    window, apply = T.ssd_crop_params(_seed(i), H, W, boxes, valid)
    out, b, v = T.random_ssd_crop(tf.constant(img), boxes, valid, _seed(i))
    x0, y0, x1, y1 = np.asarray(window)
    out, b, v = np.asarray(out), np.asarray(b), np.asarray(v)
    if not bool(apply):
      np.testing.assert_array_equal(out, img.astype(np.float32))
      np.testing.assert_array_equal(v, valid)
      continue
    applied += 1
    np.testing.assert_array_equal(out, img[y0:y1, x0:x1].astype(np.float32))
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (centre[:, 0] > x0) & (centre[:, 0] < x1) & (centre[:, 1] > y0) & (centre[:, 1] < y1)
    np.testing.assert_array_equal(v, valid & inside)
    assert v.any()  # official: a crop without any centre inside is rejected
    expect = np.concatenate([np.maximum(boxes[:, :2], [x0, y0]), np.minimum(boxes[:, 2:], [x1, y1])], 1)
    expect -= [x0, y0, x0, y0]
    np.testing.assert_allclose(b[v], expect[v])
    assert _inside(b, v, y1 - y0, x1 - x0)
  assert applied >= 10


def test_crop_respects_min_iou():
  """With one GT, an accepted crop in a min-IoU mode must reach a mode threshold."""
  boxes, valid = _boxes([(10, 10, 70, 50)])
  for i in range(30):
    window, apply = T.ssd_crop_params(_seed(i), H, W, boxes, valid)
    if bool(apply):
      x0, y0, x1, y1 = np.asarray(window, np.float32)
      b = boxes[0]
      iw = max(0.0, min(b[2], x1) - max(b[0], x0))
      ih = max(0.0, min(b[3], y1) - max(b[1], y0))
      inter = iw * ih
      iou = inter / ((b[2] - b[0]) * (b[3] - b[1]) + (x1 - x0) * (y1 - y0) - inter)
      assert iou > 0  # the centre-inside rule alone guarantees overlap
  # no valid boxes -> never cropped (official returns the image unchanged)
  for i in range(5):
    _, apply = T.ssd_crop_params(_seed(i), H, W, boxes, np.zeros(K, bool))
    assert not bool(apply)


def test_affine_identity():
  img, (boxes, _) = tf.constant(_image(), tf.float32), _boxes()
  m = T.affine_matrix(H, W, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(m, np.eye(3), atol=1e-6)
  out, b = T.warp_affine(img, boxes, m, 0.0)
  np.testing.assert_allclose(out, img, atol=1e-3)
  np.testing.assert_allclose(b, boxes, atol=1e-4)
  out = T.warp_image(img, m, fill=None)
  np.testing.assert_allclose(out, img, atol=1e-3)


def test_affine_translation_moves_content_and_boxes():
  img, (boxes, _) = tf.constant(_image(), tf.float32), _boxes()
  m = T.affine_matrix(H, W, 0.0, 1.0, 0.0, 0.0, 7.0, -4.0)
  out, b = T.warp_affine(img, boxes, m, 0.0)
  np.testing.assert_allclose(b[0], np.asarray(RECT) + [7, -4, 7, -4], atol=1e-4)
  np.testing.assert_allclose(np.asarray(out)[10:40, 30:50], np.asarray(img)[14:44, 23:43], atol=1e-3)
  np.testing.assert_allclose(np.asarray(out)[-1, 0], T.FILL_RGB, atol=1e-3)  # border = mean


def test_affine_rotation_box_covers_rectangle():
  img, (boxes, _) = tf.constant(_image(), tf.float32), _boxes()
  for angle, shx, shy in [(10.0, 0.0, 0.0), (-10.0, 2.0, -2.0), (6.0, -2.0, 1.0)]:
    m = T.affine_matrix(H, W, angle, 1.05, shx, shy, 3.0, 2.0)
    out, b = T.warp_affine(img, boxes, m, angle)
    ys, xs = np.nonzero(_rect_mask(out))
    hull = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    bb = np.asarray(b[0])
    inter = np.prod(np.maximum(0, np.minimum(hull[2:], bb[2:]) - np.maximum(hull[:2], bb[:2])))
    union = np.prod(hull[2:] - hull[:2]) + np.prod(bb[2:] - bb[:2]) - inter
    assert inter / union > 0.8, (angle, hull, bb)


def test_affine_translation_axes_not_swapped():
  """x shift is scaled by the width and y by the height (departure from official)."""
  txs, tys = [], []
  for i in range(40):
    m, _ = T.affine_params(_seed(i), 20, 400, degrees=0.0, scale=(1.0, 1.0), shear=0.0)
    m = np.asarray(m)
    txs.append(m[0, 2])
    tys.append(m[1, 2])
  assert np.abs(txs).max() <= 40.0 + 1e-4 and np.abs(tys).max() <= 2.0 + 1e-4
  assert np.abs(txs).max() > 10.0  # would be <= 2 with the official swapped axes


def test_resize_and_val_transform():
  img, (boxes, _) = tf.constant(_image()), _boxes()
  for i in range(5):
    out, b = T.random_resize(img, boxes, 32, _seed(i))
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    np.testing.assert_allclose(b, boxes * [32 / W, 32 / H, 32 / W, 32 / H], rtol=1e-6)
  out = T.val_transform(img, 48)
  assert out.shape == (48, 48, 3)
  # boxes predicted at 48 x 48 map back per axis (the plain resize): x * W / 48, y * H / 48
  np.testing.assert_allclose(rescale_boxes(np.array([48.0, 48, 48, 48]), (48, 48), (H, W)), [W, H, W, H],
                             rtol=1e-6)
  np.testing.assert_allclose(out, T.normalize(tf.image.resize(tf.cast(img, tf.float32), [48, 48])),
                             atol=1e-5)


def test_normalize():
  mean = tf.constant(np.broadcast_to(T.FILL_RGB, (4, 5, 3)), tf.float32)
  np.testing.assert_allclose(T.normalize(mean), 0.0, atol=1e-5)
  x = tf.random.stateless_uniform((7, 9, 3), [1, 2]) * 255
  ref = (np.asarray(x) / 255 - np.array(T.MEAN_RGB)) / np.array(T.STD_RGB)
  np.testing.assert_allclose(T.normalize(x), ref, atol=1e-5)
  big = tf.zeros((1000, 1000, 3))  # larger than the fast table: broadcast path
  np.testing.assert_allclose(T.normalize(big)[0, 0], -np.array(T.MEAN_RGB) / np.array(T.STD_RGB),
                             rtol=1e-5)


def test_photometric_range_and_identity():
  img = tf.constant(_image())
  for i in range(6):
    out = np.asarray(T.photometric_distort(img, _seed(i)))
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255.0 + 1e-3
  np.testing.assert_array_equal(T.photometric_distort(img, _seed(0), p=0.0), np.asarray(img, np.float32))


def test_mixup_weights_and_canvas():
  a = _image(1)
  b = _image(2, h=70, w=50)
  boxes, valid = _boxes()
  lams = []
  for i in range(6):
    im, bx, cl, wt, vd, lam = T.mixup(a, boxes, CLASSES, valid, b, boxes, CLASSES, valid, _seed(i))
    lam = float(lam)
    lams.append(lam)
    assert im.dtype == tf.uint8 and im.shape == (70, 80, 3)
    wt = np.asarray(wt)
    np.testing.assert_allclose(wt[:K], lam)
    np.testing.assert_allclose(wt[K:], 1 - lam)
    np.testing.assert_allclose(wt[:K] + wt[K:], 1.0, atol=1e-6)  # weights sum rule
    assert bx.shape == (2 * K, 4) and vd.shape == (2 * K,)
    im = np.asarray(im).astype(np.float32)
    la, lb = np.float32(lam), np.float32(1 - lam)
    np.testing.assert_allclose(im[:60, :50], np.floor(a[:, :50] * la + b[:60] * lb), atol=1)
    np.testing.assert_allclose(im[:60, 50:], np.floor(a[:, 50:] * la), atol=1)  # only image 1
    np.testing.assert_allclose(im[60:, :50], np.floor(b[60:] * lb), atol=1)  # only image 2
    np.testing.assert_array_equal(im[60:, 50:], 0)  # outside both images
  assert len(set(lams)) == 6 and all(0 <= x <= 1 for x in lams)
  draws = np.array([float(T.sample_beta(_seed(i))) for i in range(300)])
  assert abs(draws.mean() - 0.5) < 0.05 and abs(draws.std() - 0.25) < 0.04  # Beta(1.5, 1.5)


def test_to_labels_padding_format():
  boxes = np.array([[0, 0, 10, 20], [1, 1, 2, 2], [4, 6, 8, 16], [5, 5, 9, 9]], np.float32)
  valid = np.array([True, False, True, True])
  cls = np.array([3, 1, 0, 7], np.int32)
  wts = np.array([0.3, 1, 0.7, 1], np.float32)
  lab = np.asarray(T.to_labels(boxes, cls, wts, valid, max_boxes=5))
  assert lab.shape == (5, 6)
  np.testing.assert_allclose(lab[:3], [[3, 5, 10, 10, 20, 0.3], [0, 6, 11, 4, 10, 0.7],
                                       [7, 7, 7, 4, 4, 1]])
  np.testing.assert_array_equal(lab[3:], 0)
  lab2 = np.asarray(T.to_labels(boxes, cls, wts, valid, max_boxes=2))  # truncation keeps the first
  np.testing.assert_allclose(lab2, lab[:2])


def test_small_box_fallback():
  """If augmentation leaves no box with min(w, h) > 6, the un-augmented sample is used."""
  img = _image()
  boxes, valid = _boxes([(30, 30, 34, 35), (50, 10, 53, 14)])  # too small at any output size
  for i in range(4):
    out, lab = T.train_transform(img, boxes, CLASSES, WEIGHTS, valid, _seed(i), 64)
    lab = np.asarray(lab)
    scaled = boxes[:2] * [64 / W, 64 / H, 64 / W, 64 / H]
    expect = np.asarray(T.to_labels(scaled, CLASSES[:2], WEIGHTS[:2], np.ones(2, bool), 50))
    np.testing.assert_allclose(lab, expect, rtol=1e-5)
    # the image is the plain resize of the original (some interpolation) + normalisation
    plain = np.asarray(T.normalize(tf.image.resize(tf.cast(img, tf.float32), [64, 64], "nearest")))
    assert np.abs(np.asarray(out) - plain).mean() < 0.3
  # an image without boxes gives zero labels and the plain resize
  out, lab = T.train_transform(img, boxes, CLASSES, WEIGHTS, np.zeros(K, bool), _seed(0), 64)
  np.testing.assert_array_equal(lab, 0)


def test_train_transform_labels_valid_and_weights_pass_through():
  img, (boxes, valid) = _image(), _boxes()
  wts = np.full(K, 0.25, np.float32)
  for i in range(10):
    out, lab = T.train_transform(img, boxes, CLASSES, wts, valid, _seed(i), 96, max_boxes=6)
    lab = np.asarray(lab)
    assert out.shape == (96, 96, 3) and lab.shape == (6, 6)
    rows = lab[:, :5].sum(-1) > 0
    n = int(rows.sum())
    assert rows[:n].all() and not rows[n:].any()  # zero rows only at the end
    np.testing.assert_array_equal(lab[n:], 0)
    np.testing.assert_allclose(lab[:n, 5], 0.25)
    assert (np.minimum(lab[:n, 3], lab[:n, 4]) > 6).all() or n == 3  # filtered (or fallback)
    assert set(lab[:n, 0].astype(int)) <= {0, 1, 2}


def test_train_boxes_match_chain_of_standalone_ops():
  """The fused train transform has exactly the box geometry of the official op order."""
  img, (boxes, valid) = _image(), _boxes()
  compared = 0
  for i in range(12):
    seed = _seed(i)
    s = T.split_seed(seed, 8)
    x = tf.cast(T.photometric_distort(img, s[T.SEED_DISTORT]), tf.uint8)
    x, b = T.random_expand(x, boxes, s[T.SEED_EXPAND])
    x, b, v = T.random_ssd_crop(x, b, valid, s[T.SEED_CROP])
    x, b = T.random_flip(x, b, s[T.SEED_FLIP])
    x, b = T.random_affine(x, b, s[T.SEED_AFFINE])
    x, b = T.random_resize(x, b, 64, s[T.SEED_RESIZE])
    keep = T.filter_small_boxes(b, v)
    if not bool(tf.reduce_any(keep)):
      continue
    expect = T.to_labels(b, CLASSES, WEIGHTS, keep, 50)
    chain_img = T.normalize(x)
    out, lab = T.train_transform(img, boxes, CLASSES, WEIGHTS, valid, seed, 64)
    np.testing.assert_allclose(lab, expect, atol=2e-3)
    compared += 1
    # images agree up to the resampling order (resize before/after the warp)
    assert np.abs(np.asarray(out) - np.asarray(chain_img)).mean() < 0.25
  assert compared >= 6


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, K),
       frac=st.lists(st.tuples(*[st.floats(0.0, 1.0)] * 4), min_size=K, max_size=K),
       size=st.sampled_from([32, 64, 96]))
def test_train_transform_invariants_property(seed, n, frac, size):
  """Any boxes inside the image, any seed: labels inside S x S, padding at the end, finite."""
  f = np.asarray(frac, np.float32)
  x1, x2 = np.minimum(f[:, 0], f[:, 1]) * W, np.maximum(f[:, 0], f[:, 1]) * W
  y1, y2 = np.minimum(f[:, 2], f[:, 3]) * H, np.maximum(f[:, 2], f[:, 3]) * H
  boxes = np.stack([x1, y1, x2, y2], -1)
  valid = np.arange(K) < n
  out, lab = T.train_transform(_image(), boxes, CLASSES, WEIGHTS, valid, [seed, 1], size)
  out, lab = np.asarray(out), np.asarray(lab)
  assert out.shape == (size, size, 3) and np.isfinite(out).all()
  rows = lab[:, :5].sum(-1) > 0
  m = int(rows.sum())
  assert m <= n and rows[:m].all() and not rows[m:].any()
  cx, cy, w, h = lab[:m, 1:5].T
  assert (w >= 0).all() and (h >= 0).all()
  assert (cx - w / 2 >= -1e-3).all() and (cx + w / 2 <= size + 1e-3).all()
  assert (cy - h / 2 >= -1e-3).all() and (cy + h / 2 <= size + 1e-3).all()


def test_normalize_jax_equals_tf_normalize():
  rng = np.random.default_rng(7)
  img = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(T.normalize_jax(img)),
                                T.normalize(img).numpy())
