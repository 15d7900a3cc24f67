"""Box-aware training and evaluation transforms as small stateless tf ops (spec §7-§8).

Every op here is a pure function of its tensor inputs and a ``seed``: all
randomness comes from ``tf.random.stateless_*`` ops keyed by a ``(2,)`` int
seed (sub-seeds via ``tf.random.experimental.stateless_split``). The same seed
gives bit-identical results eagerly and inside ``tf.data.Dataset.map`` (graph
mode), and a training example is a pure function of (seed, step, position), so
the input pipeline can be resumed exactly (see :mod:`asff_jax.data.pipeline`).

Conventions
-----------
* ``image``: ``(H, W, 3)`` RGB. Inputs may be ``uint8`` or ``float32`` in
  ``[0, 255]``; the random ops return ``float32`` in ``[0, 255]`` (resize may
  overshoot slightly, see below); :func:`normalize` returns ImageNet-standardised
  float32, :func:`mixup` ``uint8`` (like the official ``astype(np.uint8)``),
  :func:`extract_window` keeps the input dtype.
* ``boxes``: ``(K, 4)`` float32 ``[x1, y1, x2, y2]`` in continuous pixel
  coordinates of the current image (pixel ``i`` covers ``[i, i+1)``), padded to a
  **static** capacity ``K``; ``valid``: ``(K,)`` bool says which rows are boxes
  (valid rows need not be contiguous until :func:`to_labels`). ``classes``:
  ``(K,)`` int32 contiguous class index; ``weights``: ``(K,)`` float32 mixup
  weights (1 without mixup). Geometric ops transform every row (padding rows
  harmlessly); only the crop and the small-box filter change ``valid``.
* ``seed``: ``(2,)`` int32/int64 tensor (or list), as for ``tf.random.stateless_*``.
* Output labels (:func:`to_labels`): ``(max_boxes, 6)`` float32 rows
  ``[class, cx, cy, w, h, weight]`` in input pixels, zero rows at the end only
  (spec §6; consumed by :mod:`asff_jax.models.targets`).

Ops (official TrainTransform order, spec §8; official mixup runs first, §7)
------------------------------------------------------------------------
1. :func:`photometric_distort` - brightness, "contrast" (a plain multiply, as
   official), hue, saturation; each p = 0.5.
2. :func:`random_expand` - zoom-out onto a mean-filled canvas, p = 0.5.
3. :func:`random_ssd_crop` - SSD min-IoU crop with a bounded, vectorised retry.
4. :func:`random_flip` - horizontal flip, p = 0.5.
5. :func:`random_affine` - rotation/scale/shear/translation, p = 0.5.
6. :func:`random_resize` - plain square resize with a random interpolation.
7. :func:`normalize` - /255, ImageNet mean/std.
8. :func:`filter_small_boxes` - drop boxes with min(w, h) <= 6 px; the fallback
   to the un-augmented sample lives in :func:`train_transform`.
9. :func:`mixup` - Beta(1.5, 1.5) blend on a max(h) x max(w) canvas.
10. :func:`to_labels` - compaction and padding to ``max_boxes`` rows.

:func:`train_transform` chains 1-8 and 10 for one (possibly mixed) sample;
:func:`val_transform` is the evaluation preprocessing (spec §5).

Departures from the official code (all documented at the op)
------------------------------------------------------------
* Affine translation: x shift is scaled by the image *width* and y by the
  *height* (official swaps them, spec §12.9).
* The affine warp uses one consistent continuous-coordinate convention for
  image and boxes (official is inconsistent by up to 0.5 px).
* Bounded retries: expand draws 50 candidates at once (as official's 50 tries);
  the crop draws ``rounds`` modes x 50 candidates at once instead of the
  unbounded ``while True`` loop (see :func:`ssd_crop_params`).
* Images stay float32 between the photometric steps (official re-quantises to
  uint8 after each; differences < 1 grey level); the train transform
  re-quantises once, after the photometric distortion, as official does.
* Bicubic/lanczos resize overshoot is not clipped (OpenCV saturates uint8), so
  resizing commutes with normalisation. tf has lanczos3 where OpenCV has
  lanczos4.
* In :func:`train_transform` the crop window of the expanded canvas is cut
  directly from the original image (no full canvas is materialised); the
  flip and the affine are one bilinear warp of the *normalised* image (the
  mean border becomes exactly 0), done before the resize when the crop is
  smaller than S x S (official order) and after it otherwise (matrix
  conjugated by the resize scale). Box geometry is identical to the official
  order in both cases (diagonal scaling commutes with the corner min/max, the
  shrink and the clip); only the image resampling order differs, so the
  expensive ops always run at the smaller resolution.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import tensorflow as tf

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
#: Fill colour of expand canvases and affine borders: ImageNet mean x 255 (RGB).
FILL_RGB = tuple(255.0 * m for m in MEAN_RGB)
#: Official random interpolation choice (cv2 linear, cubic, area, nearest,
#: lanczos4; tf has lanczos3, the nearest equivalent).
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest", "lanczos3")
#: SSD crop modes: min IoU per mode; ``None`` = no crop, ``-inf`` = any crop.
CROP_MODES = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -math.inf)


# --------------------------------------------------------------------------- #
# Seeds and small helpers
# --------------------------------------------------------------------------- #


def split_seed(seed, num):
  """``(2,)`` seed -> list of ``num`` independent ``(2,)`` sub-seeds."""
  seed = tf.convert_to_tensor(seed)
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _coin(seed, p):
  """Bernoulli(p) as a scalar bool (official ``random.randrange(2)`` for p = 0.5)."""
  return _uniform(seed) < p


def _randint(seed, n, shape=()):
  """Uniform int32 in ``[0, n)`` for a (possibly tensor) ``n >= 1`` (``n <= 0`` -> 0)."""
  n = tf.cast(n, tf.float32)
  v = tf.floor(_uniform(seed, shape=shape) * n)
  return tf.cast(tf.clip_by_value(v, 0.0, tf.maximum(n - 1.0, 0.0)), tf.int32)


def _hw(image):
  s = tf.shape(image)
  return s[0], s[1]


def _fill(dtype=tf.float32):
  return tf.constant(FILL_RGB, dtype)


# --------------------------------------------------------------------------- #
# 1. Photometric distortion
# --------------------------------------------------------------------------- #


def photometric_distort(image, seed, *, p=0.5, brightness=32.0, contrast=(0.5, 1.5), hue=18,
                        saturation=(0.5, 1.5)):
  """Official ``_distort`` (spec §8.1): ``(H, W, 3)`` -> ``(H, W, 3)`` float32 in [0, 255].

  Each part independently with probability ``p``, in this order:
  brightness ``+ U(-32, 32)``; "contrast" ``x U(0.5, 1.5)`` (a plain multiply,
  not around the mean - as official); hue shift by ``randint(-18, 18)`` of 180
  (OpenCV hue units, i.e. +-36 deg; ``tf.image.adjust_hue`` delta ``k / 180``);
  saturation ``x U(0.5, 1.5)`` (clipped at full saturation). Brightness and
  contrast clip to [0, 255]. Hue and saturation use the fused tf kernels, which
  are scale invariant, so they run directly on [0, 255] values.
  """
  image = tf.cast(image, tf.float32)
  s = split_seed(seed, 8)
  image = tf.cond(_coin(s[0], p),
                  lambda: tf.clip_by_value(image + _uniform(s[1], -brightness, brightness), 0.0, 255.0),
                  lambda: image)
  image = tf.cond(_coin(s[2], p),
                  lambda: tf.clip_by_value(image * _uniform(s[3], contrast[0], contrast[1]), 0.0, 255.0),
                  lambda: image)
  k = tf.cast(_randint(s[5], 2 * hue + 1) - hue, tf.float32)
  image = tf.cond(_coin(s[4], p), lambda: tf.image.adjust_hue(image, k / 180.0), lambda: image)
  image = tf.cond(_coin(s[6], p),
                  lambda: tf.image.adjust_saturation(image, _uniform(s[7], saturation[0], saturation[1])),
                  lambda: image)
  return image


# --------------------------------------------------------------------------- #
# Window extraction (shared by expand and crop)
# --------------------------------------------------------------------------- #


def extract_window(image, window, offset=(0, 0), fill=FILL_RGB):
  """Cut a window out of a virtual fill-coloured canvas holding ``image``.

  Args:
    image: ``(H, W, C)`` uint8 or float32; placed on an infinite canvas of
      colour ``fill`` with its top-left pixel at canvas ``offset = (left, top)``
      (int pixels).
    window: ``(4,)`` int ``[x0, y0, x1, y1]`` in canvas pixels (half-open).
    fill: ``(C,)`` canvas colour (default ImageNet mean x 255; cast to the
      image dtype, so uint8 images get the official truncated (123, 116, 103)).

  Returns:
    ``(y1 - y0, x1 - x0, C)`` in the image dtype. Only the intersection with
    ``image`` is copied (two concatenations), so cropping a large expanded
    canvas never materialises the canvas.
  """
  image = tf.convert_to_tensor(image)
  window = tf.cast(window, tf.int32)
  h, w = _hw(image)
  c = tf.shape(image)[2]
  left, top = tf.cast(offset[0], tf.int32), tf.cast(offset[1], tf.int32)
  x0, y0, x1, y1 = window[0], window[1], window[2], window[3]
  ww, wh = x1 - x0, y1 - y0

  def cut():
    ix0 = tf.clip_by_value(x0 - left, 0, w)
    ix1 = tf.clip_by_value(x1 - left, ix0, w)
    iy0 = tf.clip_by_value(y0 - top, 0, h)
    iy1 = tf.clip_by_value(y1 - top, iy0, h)
    sub = image[iy0:iy1, ix0:ix1]
    sh, sw = iy1 - iy0, ix1 - ix0
    pt = tf.clip_by_value(top + iy0 - y0, 0, wh)
    pl = tf.clip_by_value(left + ix0 - x0, 0, ww)
    pb = wh - pt - sh
    pr = ww - pl - sw
    f = tf.constant(fill, tf.float32)
    f = tf.cast(f, image.dtype) if image.dtype.is_floating else tf.cast(tf.floor(f), image.dtype)
    mid = tf.concat([tf.broadcast_to(f, tf.stack([sh, pl, c])), sub,
                     tf.broadcast_to(f, tf.stack([sh, pr, c]))], 1)
    return tf.concat([tf.broadcast_to(f, tf.stack([pt, ww, c])), mid,
                      tf.broadcast_to(f, tf.stack([pb, ww, c]))], 0)

  whole = (x0 == left) & (y0 == top) & (ww == w) & (wh == h)
  return tf.cond(whole, lambda: image, cut)


# --------------------------------------------------------------------------- #
# 2. Expand (zoom-out)
# --------------------------------------------------------------------------- #


def expand_params(seed, height, width, *, p=0.5, max_scale=4.0, trials=50):
  """Official ``_expand`` parameters (spec §8.2) for an image of ``height x width``.

  With probability ``p``: ``trials`` candidates ``s ~ U(1, max_scale)``,
  ``r = sqrt(U(max(0.5, 1/s^2), min(2, s^2)))``, canvas ``(int(s/r*H), int(s*r*W))``;
  the first candidate with ``s*r >= 1`` and ``s/r >= 1`` wins (official retries
  up to 50 times, drawn here at once); placement ``randint(0, canvas - size)``.

  Returns:
    ``(canvas_h, canvas_w, top, left)`` int32 scalars; ``(H, W, 0, 0)`` when
    not applied (or no candidate is valid).
  """
  s = split_seed(seed, 5)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  scale = _uniform(s[1], 1.0, max_scale, shape=(trials,))
  lo = tf.maximum(0.5, 1.0 / (scale * scale))
  hi = tf.minimum(2.0, scale * scale)
  ratio = tf.sqrt(lo + (hi - lo) * _uniform(s[2], shape=(trials,)))
  ws, hs = scale * ratio, scale / ratio
  ok = (ws >= 1.0) & (hs >= 1.0)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  apply = _coin(s[0], p) & tf.reduce_any(ok)
  cw = tf.cast(tf.floor(ws[first] * tf.cast(width, tf.float32)), tf.int32)
  ch = tf.cast(tf.floor(hs[first] * tf.cast(height, tf.float32)), tf.int32)
  cw, ch = tf.maximum(cw, width), tf.maximum(ch, height)
  left = _randint(s[3], cw - width + 1)
  top = _randint(s[4], ch - height + 1)
  zero = tf.constant(0, tf.int32)
  return (tf.where(apply, ch, height), tf.where(apply, cw, width), tf.where(apply, top, zero),
          tf.where(apply, left, zero))


def random_expand(image, boxes, seed, *, p=0.5, max_scale=4.0, fill=FILL_RGB):
  """Official zoom-out (spec §8.2): paste ``image`` on a larger mean-filled canvas.

  Args:
    image: ``(H, W, 3)``; boxes: ``(K, 4)`` xyxy pixels; seed: ``(2,)``.

  Returns:
    ``(image, boxes)``: ``(canvas_h, canvas_w, 3)`` float32 and boxes shifted
    by ``(left, top)``. Canvas is up to ``max_scale * sqrt(2)`` times larger per
    side; see :func:`expand_params`.
  """
  image = tf.cast(image, tf.float32)
  h, w = _hw(image)
  ch, cw, top, left = expand_params(seed, h, w, p=p, max_scale=max_scale)
  out = extract_window(image, tf.stack([0, 0, cw, ch]), (left, top), fill)
  shift = tf.cast(tf.stack([left, top, left, top]), tf.float32)
  return out, tf.cast(boxes, tf.float32) + shift


# --------------------------------------------------------------------------- #
# 3. SSD min-IoU crop
# --------------------------------------------------------------------------- #


def _iou_boxes_roi(boxes, roi):
  """``(K, 4)`` boxes x ``(..., 4)`` rois -> ``(..., K)`` IoU (official ``matrix_iou``, no +1)."""
  b = boxes[None, :, :] if len(roi.shape) == 2 else boxes
  r = roi[..., None, :]
  lt = tf.maximum(b[..., :2], r[..., :2])
  rb = tf.minimum(b[..., 2:], r[..., 2:])
  inter = tf.reduce_prod(rb - lt, -1) * tf.cast(tf.reduce_all(lt < rb, -1), tf.float32)
  area_b = tf.reduce_prod(b[..., 2:] - b[..., :2], -1)
  area_r = tf.reduce_prod(r[..., 2:] - r[..., :2], -1)
  return inter / (area_b + area_r - inter)


def ssd_crop_params(seed, height, width, boxes, valid, *, rounds=8, trials=50, min_scale=0.3, p=1.0):
  """Official ``_crop`` (spec §8.3) as a fixed number of vectorised draws.

  Official loop: repeat { mode ~ U{none, .1, .3, .5, .7, .9, any}; if none:
  return uncropped; up to 50 tries: scale ``s ~ U(0.3, 1)``,
  ``r = sqrt(U(max(0.5, s^2), min(2, 1/s^2)))``, ``w = int(s*r*W)``,
  ``h = int(s/r*H)``, ``l = randrange(W - w)``, ``t = randrange(H - h)``; accept
  if min IoU(GT, roi) >= min_iou and at least one GT centre is strictly inside }.

  Here ``rounds`` modes and ``rounds x trials`` candidates are drawn at once
  and the first accepted one (in official order: round, then try) is taken;
  if no round returns (neither "none" nor an accepted candidate) the image is
  left uncropped, i.e. the loop is cut after ``rounds`` iterations. The result
  equals the unbounded loop's except when all ``rounds`` rounds fail, which has
  probability ``<= (6/7) ** rounds`` (0.29 for 8 rounds) and only for images
  where *no* 50-try round can succeed in that mode, i.e. where official would
  also crop rarely. Images without valid boxes are never cropped (official).

  Args:
    seed: ``(2,)``; height, width: image size; boxes ``(K, 4)``; valid ``(K,)``.
    p: probability that the crop is attempted at all (official 1.0: always;
      its own "none" mode already leaves 1/7 of the images uncropped). The
      draw uses a sub-seed of its own, so ``p=1`` gives the official stream.

  Returns:
    ``(window, apply)``: ``(4,)`` int32 ``[x0, y0, x1, y1]`` (the whole image
    when not applied) and a scalar bool.
  """
  s = split_seed(seed, 6)
  boxes = tf.cast(boxes, tf.float32)
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  mode = _randint(s[0], len(CROP_MODES), shape=(rounds,))
  shp = (rounds, trials)
  scale = _uniform(s[1], min_scale, 1.0, shape=shp)
  lo = tf.maximum(0.5, scale * scale)
  hi = tf.minimum(2.0, 1.0 / (scale * scale))
  ratio = tf.sqrt(lo + (hi - lo) * _uniform(s[2], shape=shp))
  w = tf.floor(scale * ratio * wf)
  h = tf.floor(scale / ratio * hf)
  l = tf.cast(_randint(s[3], wf - w, shape=shp), tf.float32)
  t = tf.cast(_randint(s[4], hf - h, shape=shp), tf.float32)
  roi = tf.stack([l, t, l + w, t + h], -1)  # (R, T, 4)
  gt = tf.boolean_mask(boxes, valid)  # (n, 4): only valid boxes (cost ~ n, not K)
  iou = _iou_boxes_roi(gt, tf.reshape(roi, (-1, 4)))  # (R*T, n)
  iou = tf.reshape(iou, (rounds, trials, -1))
  min_iou = tf.reduce_min(iou, -1)  # +inf when n == 0 (never applied then)
  centre = (gt[:, :2] + gt[:, 2:]) / 2.0  # (n, 2)
  inside = tf.reduce_all((roi[..., None, :2] < centre) & (centre < roi[..., None, 2:]), -1)
  any_inside = tf.reduce_any(inside, -1)
  thr = tf.constant([math.inf if m is None else m for m in CROP_MODES], tf.float32)
  ok = (min_iou >= tf.gather(thr, mode)[:, None]) & any_inside  # (R, T)
  is_none = tf.equal(mode, 0)
  round_done = is_none | tf.reduce_any(ok, -1)
  r = tf.argmax(tf.cast(round_done, tf.int32), output_type=tf.int32)
  tr = tf.argmax(tf.cast(ok[r], tf.int32), output_type=tf.int32)
  apply = tf.reduce_any(round_done) & ~is_none[r] & tf.reduce_any(valid) & _coin(s[5], p)
  full = tf.stack([0.0, 0.0, wf, hf])
  window = tf.where(apply, roi[r, tr], full)
  return tf.cast(window, tf.int32), apply


def crop_boxes(boxes, valid, window, apply):
  """Boxes after an SSD crop ``window`` (official: keep centre-inside, clip, shift).

  Returns ``(boxes, valid)``; unchanged when ``apply`` is False.
  """
  boxes = tf.cast(boxes, tf.float32)
  win = tf.cast(window, tf.float32)
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0
  inside = tf.reduce_all((win[:2] < centre) & (centre < win[2:]), -1)
  clipped = tf.concat([tf.maximum(boxes[:, :2], win[:2]), tf.minimum(boxes[:, 2:], win[2:])], -1)
  clipped = clipped - tf.concat([win[:2], win[:2]], 0)
  return tf.where(apply, clipped, boxes), tf.where(apply, valid & inside, valid)


def random_ssd_crop(image, boxes, valid, seed, *, rounds=8, fill=FILL_RGB):
  """SSD min-IoU crop (spec §8.3): ``(image, boxes, valid)`` -> same, cropped.

  Image ``(H, W, 3)`` -> ``(h, w, 3)`` float32; boxes ``(K, 4)`` shifted into the
  crop and clipped; boxes whose centre is not strictly inside lose ``valid``.
  See :func:`ssd_crop_params` for the bounded-retry equivalence.
  """
  image = tf.cast(image, tf.float32)
  h, w = _hw(image)
  window, apply = ssd_crop_params(seed, h, w, boxes, valid, rounds=rounds)
  out = extract_window(image, window, (0, 0), fill)
  boxes, valid = crop_boxes(boxes, valid, window, apply)
  return out, boxes, valid


# --------------------------------------------------------------------------- #
# 4. Horizontal flip
# --------------------------------------------------------------------------- #


def hflip_boxes(boxes, width):
  """``x -> W - x`` for ``(K, 4)`` xyxy boxes (x1 and x2 swap roles)."""
  boxes = tf.cast(boxes, tf.float32)
  wf = tf.cast(width, tf.float32)
  return tf.stack([wf - boxes[:, 2], boxes[:, 1], wf - boxes[:, 0], boxes[:, 3]], -1)


def hflip(image, boxes):
  """Deterministic horizontal flip of image ``(H, W, 3)`` and boxes ``(K, 4)``."""
  image = tf.cast(image, tf.float32)
  return tf.reverse(image, [1]), hflip_boxes(boxes, tf.shape(image)[1])


def random_flip(image, boxes, seed, *, p=0.5):
  """Official ``_mirror`` (spec §8.4): horizontal flip with probability ``p``."""
  image = tf.cast(image, tf.float32)
  boxes = tf.cast(boxes, tf.float32)
  return tf.cond(_coin(seed, p), lambda: hflip(image, boxes), lambda: (image, boxes))


# --------------------------------------------------------------------------- #
# 5. Random affine
# --------------------------------------------------------------------------- #


def affine_matrix(height, width, angle, scale, shear_x, shear_y, tx, ty):
  """``(3, 3)`` float32 affine map in continuous pixel coordinates (official ``M = S @ T @ R``).

  ``R`` rotates by ``angle`` degrees (counter-clockwise as displayed, OpenCV
  ``getRotationMatrix2D``) and scales by ``scale`` about the image centre
  ``(W/2, H/2)``; ``T`` translates by ``(tx, ty)`` pixels; ``S`` shears by
  ``tan(shear_x)`` (x += tan*y) and ``tan(shear_y)`` (y += tan*x), in degrees.
  """
  f = lambda v: tf.cast(v, tf.float32)
  a = f(angle) * (math.pi / 180.0)
  cx, cy = f(width) / 2.0, f(height) / 2.0
  al, be = f(scale) * tf.cos(a), f(scale) * tf.sin(a)
  one, zero = tf.constant(1.0), tf.constant(0.0)
  r = tf.stack([tf.stack([al, be, (1.0 - al) * cx - be * cy]),
                tf.stack([-be, al, be * cx + (1.0 - al) * cy]),
                tf.stack([zero, zero, one])])
  t = tf.stack([tf.stack([one, zero, f(tx)]), tf.stack([zero, one, f(ty)]),
                tf.stack([zero, zero, one])])
  sx = tf.tan(f(shear_x) * (math.pi / 180.0))
  sy = tf.tan(f(shear_y) * (math.pi / 180.0))
  sh = tf.stack([tf.stack([one, sx, zero]), tf.stack([sy, one, zero]), tf.stack([zero, zero, one])])
  return sh @ t @ r


def affine_params(seed, height, width, *, degrees=10.0, translate=0.1, scale=(0.9, 1.1), shear=2.0):
  """Random affine parameters (spec §8.5) -> ``(matrix (3, 3), angle_deg)``.

  angle ``U(-10, 10)`` deg, scale ``U(0.9, 1.1)``, shear ``U(-2, 2)`` deg on both
  axes, translation ``U(-0.1, 0.1) * W`` in x and ``U(-0.1, 0.1) * H`` in y.
  **Departure**: the official code scales the x shift by H and y by W (swapped,
  spec §12.9); here each axis uses its own extent.
  """
  s = split_seed(seed, 6)
  angle = _uniform(s[0], -degrees, degrees)
  sc = _uniform(s[1], scale[0], scale[1])
  tx = _uniform(s[2], -translate, translate) * tf.cast(width, tf.float32)
  ty = _uniform(s[3], -translate, translate) * tf.cast(height, tf.float32)
  shx = _uniform(s[4], -shear, shear)
  shy = _uniform(s[5], -shear, shear)
  return affine_matrix(height, width, angle, sc, shx, shy, tx, ty), angle


def affine_boxes(boxes, matrix, angle, height, width):
  """Official box warp: corners -> ``matrix`` -> min/max -> shrink -> clip.

  The axis-aligned hull of the 4 warped corners is shrunk about its centre by
  ``max(|sin a|, |cos a|) ** 0.5`` (``a`` = rotation angle in degrees) and
  clipped to ``[0, W] x [0, H]``. ``boxes``: ``(K, 4)``; returns ``(K, 4)``.
  """
  boxes = tf.cast(boxes, tf.float32)
  m = tf.cast(matrix, tf.float32)
  x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
  xs = tf.stack([x1, x2, x2, x1], -1)
  ys = tf.stack([y1, y1, y2, y2], -1)
  wx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
  wy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
  lo_x, hi_x = tf.reduce_min(wx, -1), tf.reduce_max(wx, -1)
  lo_y, hi_y = tf.reduce_min(wy, -1), tf.reduce_max(wy, -1)
  a = tf.cast(angle, tf.float32) * (math.pi / 180.0)
  red = tf.sqrt(tf.maximum(tf.abs(tf.sin(a)), tf.abs(tf.cos(a))))
  cx, cy = (lo_x + hi_x) / 2.0, (lo_y + hi_y) / 2.0
  hw, hh = (hi_x - lo_x) * red / 2.0, (hi_y - lo_y) * red / 2.0
  wf, hf = tf.cast(width, tf.float32), tf.cast(height, tf.float32)
  return tf.stack([tf.clip_by_value(cx - hw, 0.0, wf), tf.clip_by_value(cy - hh, 0.0, hf),
                   tf.clip_by_value(cx + hw, 0.0, wf), tf.clip_by_value(cy + hh, 0.0, hf)], -1)


def warp_image(image, matrix, out_hw=None, fill=FILL_RGB):
  """Warp ``(H, W, C)`` by a continuous-coordinate affine ``matrix`` (bilinear, constant fill).

  ``ImageProjectiveTransformV3`` samples at pixel centres, so the matrix is
  conjugated by the half-pixel shift: ``M_idx = T(-1/2) M T(+1/2)``; image and
  boxes then follow exactly the same geometry. Per-channel ``fill`` is done by
  warping ``image - fill`` with fill 0 and adding ``fill`` back; ``fill=None``
  fills with 0 directly (used on normalised images, where the ImageNet-mean
  border is exactly 0). Returns ``out_hw`` (default ``(H, W)``) float32.
  """
  image = tf.cast(image, tf.float32)
  h, w = _hw(image)
  out_hw = tf.stack([h, w]) if out_hw is None else tf.cast(tf.stack(out_hw), tf.int32)
  m = tf.cast(matrix, tf.float32)
  half = tf.constant([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
  mhalf = tf.constant([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
  inv = tf.linalg.inv(mhalf @ m @ half)  # output index -> input index
  transform = tf.concat([inv[0, :], inv[1, :], tf.zeros((2,))], 0)[None]
  fill_t = None if fill is None else tf.constant(fill, tf.float32)
  src = image if fill is None else image - fill_t
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=src[None], transforms=transform, output_shape=out_hw,
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return out if fill is None else out + fill_t


def warp_affine(image, boxes, matrix, angle, fill=FILL_RGB):
  """Deterministic affine of image ``(H, W, 3)`` and boxes ``(K, 4)`` (spec §8.5)."""
  h, w = _hw(image)
  return warp_image(image, matrix, None, fill), affine_boxes(boxes, matrix, angle, h, w)


def random_affine(image, boxes, seed, *, p=0.5, fill=FILL_RGB, **kwargs):
  """Official ``_random_affine`` with probability ``p`` (spec §8.5); see :func:`affine_params`."""
  image = tf.cast(image, tf.float32)
  boxes = tf.cast(boxes, tf.float32)
  s = split_seed(seed, 2)
  h, w = _hw(image)
  matrix, angle = affine_params(s[1], h, w, **kwargs)
  return tf.cond(_coin(s[0], p), lambda: warp_affine(image, boxes, matrix, angle, fill),
                 lambda: (image, boxes))


# --------------------------------------------------------------------------- #
# 6-8. Resize, normalisation, small-box filter
# --------------------------------------------------------------------------- #


def resize_image(image, size, method="bilinear"):
  """Plain (non-letterbox) resize of ``(H, W, C)`` to ``(size, size, C)`` float32.

  ``method``: python string from :data:`INTERPOLATIONS` or an int32 tensor index
  into it (graph-mode ``switch_case``). ``antialias=False`` like OpenCV.
  Bicubic/lanczos overshoot is *not* clipped (OpenCV saturates it on uint8
  images); without the clip resizing is linear, so it commutes exactly with
  :func:`normalize` and the train transform may normalise at whichever
  resolution is smaller.
  """
  image = tf.convert_to_tensor(image)
  size = tf.cast(size, tf.int32)
  hw = tf.stack([size, size])

  def run(m):
    return tf.cast(tf.image.resize(image, hw, method=m), tf.float32)

  if isinstance(method, str):
    return run(method)
  return tf.switch_case(tf.cast(method, tf.int32), [(lambda m=m: run(m)) for m in INTERPOLATIONS])


def resize_boxes(boxes, height, width, size):
  """Scale ``(K, 4)`` xyxy boxes from ``height x width`` to ``size x size``."""
  sx = tf.cast(size, tf.float32) / tf.cast(width, tf.float32)
  sy = tf.cast(size, tf.float32) / tf.cast(height, tf.float32)
  return tf.cast(boxes, tf.float32) * tf.stack([sx, sy, sx, sy])


def random_resize(image, boxes, size, seed):
  """Spec §8.6: resize to ``size x size`` with an interpolation drawn uniformly
  from :data:`INTERPOLATIONS` (official picks among 5 cv2 methods)."""
  h, w = _hw(image)
  method = _randint(seed, len(INTERPOLATIONS))
  return resize_image(image, size, method), resize_boxes(boxes, h, w, size)


#: Largest image (in pixels) normalised with the fast precomputed-table path.
NORM_TABLE_PIXELS = 640 * 640


@functools.lru_cache(maxsize=None)
def _norm_tables():
  scale = np.array([1.0 / (255.0 * sd) for sd in STD_RGB], np.float32)
  bias = np.array([m / sd for m, sd in zip(MEAN_RGB, STD_RGB)], np.float32)
  return np.tile(scale, NORM_TABLE_PIXELS), np.tile(bias, NORM_TABLE_PIXELS), scale, bias


def normalize(image):
  """Spec §8.7: ``(image / 255 - mean) / std`` with ImageNet RGB mean/std; float32.

  ``(H, W, 3)`` -> ``(H, W, 3)``. Implemented as ``x * a - b`` on the flattened
  image against precomputed per-element tables (a same-shape multiply-add is
  ~4x faster in TF than broadcasting a ``(3,)`` vector); images larger than
  :data:`NORM_TABLE_PIXELS` use the broadcast. Both give identical values.
  """
  image = tf.cast(image, tf.float32)
  a, b, scale, bias = _norm_tables()
  n = tf.size(image)

  def fast():
    flat = tf.reshape(image, [-1]) * tf.constant(a)[:n] - tf.constant(b)[:n]
    return tf.reshape(flat, tf.shape(image))

  return tf.cond(n <= a.size, fast, lambda: image * scale - bias)


def normalize_jax(images):
  """:func:`normalize` in JAX, same ``x * a - b`` arithmetic (same float32 values).

  ``(..., 3)`` array in [0, 255] (any dtype) → float32. Used where the
  normalisation runs inside a jitted function (export, backbone pre-training).
  """

  _, _, scale, bias = _norm_tables()
  return jnp.asarray(images).astype(jnp.float32) * scale - bias


def filter_small_boxes(boxes, valid, min_size=6.0):
  """Spec §8.8: ``valid & (min(w, h) > min_size)`` for ``(K, 4)`` xyxy boxes."""
  wh = boxes[:, 2:] - boxes[:, :2]
  return valid & (tf.reduce_min(wh, -1) > min_size)


# --------------------------------------------------------------------------- #
# 9. Mixup
# --------------------------------------------------------------------------- #


def sample_beta(seed, alpha=1.5, beta=1.5):
  """Stateless ``Beta(alpha, beta)`` scalar via two gamma draws, clipped to [0, 1]."""
  s = split_seed(seed, 2)
  g1 = tf.random.stateless_gamma((), s[0], alpha=alpha)
  g2 = tf.random.stateless_gamma((), s[1], alpha=beta)
  return tf.clip_by_value(g1 / (g1 + g2), 0.0, 1.0)


def mixup(image1, boxes1, classes1, valid1, image2, boxes2, classes2, valid2, seed, *, alpha=1.5,
          lam=None):
  """Official BoF mixup (spec §7 "Mixup"), applied *before* the train transform.

  ``lam ~ Beta(alpha, alpha)`` (or the given ``lam``). Canvas
  ``max(H1, H2) x max(W1, W2)``; both images are pasted at the top-left,
  weighted ``lam`` and ``1 - lam``, summed and truncated to uint8 like the
  official ``astype(np.uint8)``. Boxes keep their pixel coordinates.

  Returns:
    ``(image uint8 (H, W, 3), boxes (K1+K2, 4), classes (K1+K2,), weights
    (K1+K2,) = [lam]*K1 + [1-lam]*K2, valid (K1+K2,), lam)``.
  """
  lam = sample_beta(seed, alpha, alpha) if lam is None else tf.cast(lam, tf.float32)
  i1, i2 = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
  h1, w1 = _hw(i1)
  h2, w2 = _hw(i2)
  h, w = tf.maximum(h1, h2), tf.maximum(w1, w2)
  c1 = tf.pad(i1 * lam, [[0, h - h1], [0, w - w1], [0, 0]])
  c2 = tf.pad(i2 * (1.0 - lam), [[0, h - h2], [0, w - w2], [0, 0]])
  image = tf.cast(tf.clip_by_value(c1 + c2, 0.0, 255.0), tf.uint8)
  k1, k2 = tf.shape(boxes1)[0], tf.shape(boxes2)[0]
  weights = tf.concat([tf.fill([k1], lam), tf.fill([k2], 1.0 - lam)], 0)
  return (image, tf.concat([tf.cast(boxes1, tf.float32), tf.cast(boxes2, tf.float32)], 0),
          tf.concat([tf.cast(classes1, tf.int32), tf.cast(classes2, tf.int32)], 0), weights,
          tf.concat([valid1, valid2], 0), lam)


# --------------------------------------------------------------------------- #
# 10. Labels
# --------------------------------------------------------------------------- #


def to_labels(boxes, classes, weights, valid, max_boxes=50):
  """Compact valid rows to the front and pad/truncate to ``(max_boxes, 6)``.

  Rows are ``[class, cx, cy, w, h, weight]`` (input pixels; spec §6, §8.9),
  in the original order of the valid boxes; the first ``max_boxes`` are kept
  (official ``labels[:50]``); zero rows only at the end.
  """
  order = tf.argsort(tf.cast(~valid, tf.int32), stable=True)
  boxes = tf.gather(tf.cast(boxes, tf.float32), order)
  cls = tf.gather(tf.cast(classes, tf.float32), order)
  wts = tf.gather(tf.cast(weights, tf.float32), order)
  keep = tf.gather(valid, order)
  wh = boxes[:, 2:] - boxes[:, :2]
  rows = tf.concat([cls[:, None], boxes[:, :2] + wh / 2.0, wh, wts[:, None]], -1)
  rows = tf.where(keep[:, None], rows, 0.0)
  k = tf.shape(rows)[0]
  rows = tf.pad(rows, [[0, tf.maximum(max_boxes - k, 0)], [0, 0]])[:max_boxes]
  return tf.ensure_shape(rows, (max_boxes, 6))


# --------------------------------------------------------------------------- #
# Full train / val transforms
# --------------------------------------------------------------------------- #

#: Sub-seed slots of :func:`train_transform` (``split_seed(seed, 8)[i]``).
SEED_DISTORT, SEED_EXPAND, SEED_CROP, SEED_RESIZE, SEED_FLIP, SEED_AFFINE, SEED_FALLBACK = range(7)


def _flip_matrix(width):
  """``(3, 3)`` continuous-coordinate horizontal flip ``x -> W - x``."""
  wf = tf.cast(width, tf.float32)
  return tf.stack([tf.stack([-1.0, 0.0, wf]), tf.constant([0.0, 1.0, 0.0]),
                   tf.constant([0.0, 0.0, 1.0])])


def train_transform(image, boxes, classes, weights, valid, seed, size, *, max_boxes=50,
                    min_size=6.0, crop_rounds=8, fill=FILL_RGB, flip_p=0.5, expand_p=0.5,
                    expand_max_scale=4.0, affine_p=0.5, crop_p=1.0):
  """Official TrainTransform (spec §8) for one (possibly mixed-up) sample.

  Args:
    image: ``(H, W, 3)`` uint8 (or float32 in [0, 255]), RGB.
    boxes: ``(K, 4)`` xyxy pixels; classes ``(K,)`` int32; weights ``(K,)``
      float32 (mixup weight, 1 without mixup); valid ``(K,)`` bool.
    seed: ``(2,)``; size: int (python or scalar tensor), square output side S.
    flip_p, expand_p, expand_max_scale, affine_p, crop_p: augmentation strength
      (official: 0.5, 0.5, 4.0, 0.5, 1.0). Changing them keeps the random streams of
      the other ops unchanged. E.g. the digits config sets ``flip_p=0``
      (mirrored digits are not digits).

  Returns:
    ``(image (S, S, 3) float32 normalised, labels (max_boxes, 6) float32)``.

  Box geometry follows the official order exactly: distort -> expand -> crop
  -> flip -> affine (parameters drawn for the crop size, as official) ->
  resize -> drop min(w, h) <= 6 px (in S-pixels) -> labels. Boxes are computed
  as resize -> flip -> affine with the matrix conjugated by the resize scale,
  which is identical (diagonal scaling commutes with the corner min/max, the
  shrink and the clip).

  The image is computed with the same geometry but fused for speed:
  distort (float) -> re-quantise to uint8 (as official) -> the crop window of
  the virtual expanded canvas is cut directly from the image (uint8, no
  canvas) -> then, at whichever resolution is smaller:

  * crop smaller than S x S: normalise, flip + affine as *one* bilinear warp
    (the official order), then random-interpolation resize to S;
  * otherwise: random-interpolation resize to S, normalise, flip + affine as
    one warp at S.

  Normalising before the warp makes the ImageNet-mean border exactly 0, so no
  per-channel fill is needed; resizing is linear (no clip), so it commutes
  with normalisation. Fallback (official): if no box survives, the
  un-augmented image resized (fresh random interpolation) with its original,
  unfiltered boxes is returned. Sub-seeds: ``split_seed(seed, 8)[SEED_*]``, the
  same slots as the standalone ops use, so chaining :func:`random_expand`,
  :func:`random_ssd_crop`, :func:`random_flip`, :func:`random_affine`,
  :func:`random_resize` with those sub-seeds gives the same boxes.
  """
  image = tf.convert_to_tensor(image)
  boxes = tf.cast(boxes, tf.float32)
  s = split_seed(seed, 8)
  h0, w0 = _hw(image)
  size = tf.cast(size, tf.int32)
  sf = tf.cast(size, tf.float32)

  # distort, expand, crop
  img = tf.cast(photometric_distort(image, s[SEED_DISTORT]), tf.uint8)  # clipped; truncation
  ch, cw, top, left = expand_params(s[SEED_EXPAND], h0, w0, p=expand_p,
                                     max_scale=expand_max_scale)
  bx = boxes + tf.cast(tf.stack([left, top, left, top]), tf.float32)
  window, crop_on = ssd_crop_params(s[SEED_CROP], ch, cw, bx, valid, rounds=crop_rounds, p=crop_p)
  img = extract_window(img, window, (left, top), fill)
  bx, vd = crop_boxes(bx, valid, window, crop_on)
  hc, wc = _hw(img)

  # random draws of flip, affine, interpolation (same sub-seed use as the standalone ops)
  method = _randint(s[SEED_RESIZE], len(INTERPOLATIONS))
  flip_on = _coin(s[SEED_FLIP], flip_p)
  sa = split_seed(s[SEED_AFFINE], 2)
  affine_on = _coin(sa[0], affine_p)
  m, angle = affine_params(sa[1], hc, wc)

  # boxes: resize -> flip -> conjugated affine (== official flip -> affine -> resize)
  bx = resize_boxes(bx, hc, wc, size)
  bx = tf.where(flip_on, hflip_boxes(bx, size), bx)
  d = tf.stack([tf.stack([sf / tf.cast(wc, tf.float32), 0.0, 0.0]),
                tf.stack([0.0, sf / tf.cast(hc, tf.float32), 0.0]), tf.constant([0.0, 0.0, 1.0])])
  m_s = d @ m @ tf.linalg.inv(d)
  bx = tf.where(affine_on, affine_boxes(bx, m_s, angle, size, size), bx)

  # image
  def flip_affine(x, matrix, width):
    matrix = tf.where(flip_on, matrix @ _flip_matrix(width), matrix)
    return tf.cond(affine_on, lambda: warp_image(x, matrix, None, None),
                   lambda: tf.cond(flip_on, lambda: tf.reverse(x, [1]), lambda: x))

  def small_crop():
    return resize_image(flip_affine(normalize(img), m, wc), size, method)

  def large_crop():
    return flip_affine(normalize(resize_image(img, size, method)), m_s, size)

  img = tf.cond(hc * wc < size * size, small_crop, large_crop)
  keep = filter_small_boxes(bx, vd, min_size)

  def fallback():
    fb_img, fb_boxes = random_resize(image, boxes, size, s[SEED_FALLBACK])
    return normalize(fb_img), fb_boxes, valid

  img, bx, keep = tf.cond(tf.reduce_any(keep), lambda: (img, bx, keep), fallback)
  img = tf.ensure_shape(img, (None, None, 3))
  return img, to_labels(bx, classes, weights, keep, max_boxes)


def val_transform(image, size):
  """Official ValTransform (spec §5): bilinear resize to ``size x size`` + normalise.

  Args:
    image: ``(H, W, 3)`` uint8 or float32 [0, 255] RGB; size: int.

  Returns:
    ``(S, S, 3)`` float32. Predicted boxes in input pixels map back to the
    original image with :func:`asff_jax.boxes.rescale_boxes` ``(boxes, (S, S), (H, W))``.
  """
  return normalize(resize_image(image, size, "bilinear"))
