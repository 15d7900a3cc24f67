"""Tests of the training/eval input pipelines (asff_jax.data.pipeline, spec §7-§8).

Written against a tiny in-memory fake with the interface of
``asff_jax.data.sources`` (``len``, ``source[i]`` -> dict of numpy with encoded
image bytes and xyxy pixel boxes).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from asff_jax.data import pipeline as P
from asff_jax.data.synthetic import SyntheticSource
from asff_jax.data import transforms as T

SIZES = (64, 96, 128)
EVERY = 2


class FakeSource:
  """In-memory random-access source: small JPEG/PNG images of varied sizes with boxes."""

  def __init__(self, n=10, seed=0):
    rng = np.random.default_rng(seed)
    self.num_classes = 5
    self.category_ids = [1, 2, 3, 5, 8]
    self.class_names = ["a", "b", "c", "d", "e"]
    self.items = []
    for i in range(n):
      h, w = int(rng.integers(48, 90)), int(rng.integers(48, 90))
      img = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
      nb = 0 if i == 3 else int(rng.integers(1, 5))  # one image without boxes
      x1 = rng.uniform(0, w * 0.6, nb)
      y1 = rng.uniform(0, h * 0.6, nb)
      boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(12, w * 0.6, nb), w),
                        np.minimum(y1 + rng.uniform(12, h * 0.6, nb), h)], -1).astype(np.float32)
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, "PNG" if i % 3 == 0 else "JPEG")
      self.items.append({
          "image": buf.getvalue(), "image_id": 100 + i, "height": h, "width": w,
          "boxes": boxes.reshape(-1, 4), "classes": rng.integers(0, 5, nb).astype(np.int32),
          "is_crowd": np.arange(nb) == 1})

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[int(i)]


@pytest.fixture(scope="module")
def source():
  return FakeSource()


SCHEDULE = P.TrainSchedule(seed=3, sizes=SIZES, resize_every=EVERY, first_size=None,
                           final_size=64, fixed_size_from=9, mixup_off_from=6)


def _run(source, *, start_step=0, num_steps=4, batch=4, pi=0, pc=1, seed=7, **kw):
  kw.setdefault("size_schedule", SCHEDULE.input_size_at)
  kw.setdefault("mixup_schedule", SCHEDULE.mixup_at)
  return list(P.train_batches(source, seed=seed, global_batch_size=batch, start_step=start_step,
                              num_steps=num_steps, process_index=pi, process_count=pc,
                              max_boxes=8, **kw))


@pytest.fixture(scope="module")
def full_run(source):
  return _run(source, num_steps=7)


def test_shapes_dtypes_and_steps(full_run):
  assert [b["step"] for b in full_run] == list(range(7))
  for b in full_run:
    s = SCHEDULE.input_size_at(b["step"])
    assert b["images"].shape == (4, s, s, 3) and b["images"].dtype == np.float32
    assert b["labels"].shape == (4, 8, 6) and b["labels"].dtype == np.float32
    assert np.isfinite(b["images"]).all()


def test_labels_format(full_run):
  for b in full_run:
    s = b["images"].shape[1]
    for lab in b["labels"]:
      rows = lab[:, :5].sum(-1) > 0
      n = int(rows.sum())
      assert rows[:n].all() and not rows[n:].any()
      np.testing.assert_array_equal(lab[n:], 0)  # zero rows only at the end
      cls, cx, cy, w, h, wt = lab[:n].T
      assert ((cls >= 0) & (cls < 5) & (cls == np.round(cls))).all()
      assert (cx - w / 2 >= -1e-3).all() and (cx + w / 2 <= s + 1e-3).all()
      assert (cy - h / 2 >= -1e-3).all() and (cy + h / 2 <= s + 1e-3).all()
      assert ((wt > 0) & (wt <= 1)).all()
      if not SCHEDULE.mixup_at(b["step"]):
        np.testing.assert_array_equal(wt, 1.0)


def test_mixup_schedule_sets_weights(full_run):
  mixed = [b for b in full_run if SCHEDULE.mixup_at(b["step"])]
  plain = [b for b in full_run if not SCHEDULE.mixup_at(b["step"])]
  assert mixed and plain
  w = np.concatenate([b["labels"][..., 5].ravel() for b in mixed])
  assert ((w > 0) & (w < 1)).any()  # lambda and 1 - lambda
  w = np.concatenate([b["labels"][..., 5].ravel() for b in plain])
  assert set(np.unique(w)) <= {0.0, 1.0}


def test_resume_is_exact(source, full_run):
  """Batches from start_step=k equal the uninterrupted run's batches from k, bit for bit."""
  resumed = _run(source, start_step=3, num_steps=4)
  for a, b in zip(full_run[3:], resumed):
    assert a["step"] == b["step"]
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_process_slices_concatenate_to_global_batch(source, full_run):
  parts = [_run(source, start_step=2, num_steps=3, pi=p, pc=2) for p in range(2)]
  for k in range(3):
    ref = full_run[2 + k]
    assert parts[0][k]["images"].shape[0] == 2
    np.testing.assert_array_equal(
        np.concatenate([parts[0][k]["images"], parts[1][k]["images"]]), ref["images"])
    np.testing.assert_array_equal(
        np.concatenate([parts[0][k]["labels"], parts[1][k]["labels"]]), ref["labels"])


def test_different_seed_differs(source, full_run):
  other = _run(source, num_steps=1, seed=8)
  assert not np.array_equal(other[0]["labels"], full_run[0]["labels"])


def test_size_schedule():
  sizes = [SCHEDULE.input_size_at(s) for s in range(40)]
  assert set(sizes[:9]) <= set(SIZES)
  for s in range(1, 9):
    if s % EVERY:
      assert sizes[s] == sizes[s - 1]  # changes only at multiples of EVERY
  assert all(x == 64 for x in sizes[9:])  # fixed final phase
  long = P.TrainSchedule(seed=1, resize_every=10)
  seq = [long.input_size_at(s) for s in range(0, 2000, 10)]
  assert seq[0] == 608  # official: training starts at 608
  assert set(seq) == set(P.DEFAULT_SIZES)
  assert all(long.input_size_at(s) == long.input_size_at(s - s % 10) for s in range(0, 300, 7))
  assert P.TrainSchedule(seed=2, resize_every=10).input_size_at(500) == \
      P.TrainSchedule(seed=2, resize_every=10).input_size_at(505)
  assert not P.TrainSchedule(mixup_off_from=5).mixup_at(5)
  assert P.TrainSchedule(mixup_off_from=5).mixup_at(4)
  assert not P.TrainSchedule(mixup=False).mixup_at(0)
  assert P.input_size_at(123, random_resize=False, final_size=416) == 416


def test_epoch_permutation_covers_dataset():
  n, b = 10, 4
  seen = [P.example_index(5, step, pos, b, n) for step in range(5) for pos in range(b)]
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  assert seen[:10] != seen[10:20]
  for step in range(3):
    for pos in range(b):
      i = P.example_index(5, step, pos, b, n)
      partner, seed = P.example_randomness(5, step, pos, i, n)
      assert partner != i and 0 <= partner < n and seed.shape == (2,) and seed.dtype == np.int32


def test_eval_batches_padding(source):
  batches = list(P.eval_batches(source, size=64, batch_size=4, process_index=0, process_count=1))
  assert len(batches) == 3
  ids = np.concatenate([b["image_ids"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(ids[:10], np.arange(100, 110))
  np.testing.assert_array_equal(ids[10:], -1)
  np.testing.assert_array_equal(valid, np.arange(12) < 10)
  hw = np.concatenate([b["orig_hw"] for b in batches])
  np.testing.assert_array_equal(hw[:10], [[source[i]["height"], source[i]["width"]] for i in range(10)])
  img = tf.io.decode_image(source[4]["image"], channels=3)
  expect = T.val_transform(img, 64)
  np.testing.assert_allclose(batches[1]["images"][0], expect, atol=1e-4)
  assert batches[0]["images"].shape == (4, 64, 64, 3)
  # two processes: slices of the same global batches
  parts = [list(P.eval_batches(source, size=64, batch_size=4, process_index=p, process_count=2))
           for p in range(2)]
  for k in range(3):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][k]["image_ids"], parts[1][k]["image_ids"]]), batches[k]["image_ids"])


def test_make_global_batch(full_run):
  import jax
  from asff_jax.training import sharding as shd

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  arrays = {k: full_run[0][k] for k in ("images", "labels")}
  out = shd.make_global_batch(arrays, mesh, full_run[0]["images"].shape[0])
  assert isinstance(out["images"], jax.Array) and out["images"].shape == full_run[0]["images"].shape
  np.testing.assert_array_equal(np.asarray(out["labels"]), full_run[0]["labels"])
  assert full_run[0]["step"] == 0


def test_measure_throughput_smoke():
  src = SyntheticSource(3, height=96, width=128)
  r = P.measure_throughput(src, size=64, batch_size=2, num_batches=2, warmup_batches=1)
  assert r["images"] == 4 and r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0
