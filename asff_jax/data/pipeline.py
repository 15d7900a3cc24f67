"""Deterministic, resumable, multi-host training and evaluation input pipelines (spec §7-§8).

Design: index-based ``tf.data`` with stateless random ops
---------------------------------------------------------
The pipeline is a ``tf.data.Dataset.range`` over *local element numbers*; each
element is mapped to ``(step, position-in-global-batch)`` and from there, by
pure functions, to everything random:

* example index: global example number ``g = step * B + pos``; epoch
  ``g // N``; index ``perm(seed, epoch)[g % N]`` with a seeded numpy
  permutation per epoch (so epochs are without replacement; a global batch may
  straddle an epoch boundary - there is no dropped remainder);
* mixup partner: uniform over the *other* examples (official, spec §7), drawn
  from ``SeedSequence([seed, step, pos])``;
* augmentation seed: a ``(2,)`` int32 seed from the same ``SeedSequence``,
  consumed by the stateless ops of :mod:`asff_jax.data.transforms`;
* input size and mixup on/off: ``size_schedule(step)`` and
  ``mixup_schedule(step)``, pure functions of the step (see
  :class:`TrainSchedule`).

So the batch at global step ``s`` is a pure function of ``(seed, s)`` (and the
source), independent of history: resuming at ``start_step=k`` yields exactly
the batches an uninterrupted run sees from step ``k`` - no iterator state is
checkpointed, only the step (spec item "resume"). Reading the encoded bytes by
index runs in a python ``tf.numpy_function`` (random access into the source,
which is python); decoding (``tf.io.decode_image``) and all augmentation run
in the TF graph, in parallel (``num_parallel_calls=AUTOTUNE``,
``deterministic=True``), followed by ``prefetch``.

Why tf.data rather than grain: grain is not installed in this environment,
the augmentation is written as TF ops anyway (needed for graph-mode speed),
and ``tf.data`` with an index dataset gives the same random-access,
pure-function-of-index semantics as a grain ``MapDataset`` with no extra
dependency.

Random shape (spec §7 "Random shape"): every ``resize_every`` steps the side
``S`` is drawn from ``sizes`` (default 320..608 step 32) as a pure function of
``(seed, step // resize_every)``; the first block uses ``first_size`` (official
starts at 608); from ``fixed_from`` on the size is ``final_size``. All images of
a step share one static ``S``, so a jitted train step compiles once per size:
expect 10 compilations (one per size) early in training, each costing a full
XLA compile of the train step (tens of seconds on CPU, seconds to a minute on
accelerators); they are cached afterwards.

Multi-host: process ``p`` of ``P`` produces rows ``[p*B/P, (p+1)*B/P)`` of every
global batch (defaults ``jax.process_index()``, ``jax.process_count()``);
:func:`asff_jax.training.sharding.make_global_batch` assembles the global ``jax.Array``.

Label format: ``(B, max_boxes, 6)`` rows ``[class, cx, cy, w, h, weight]`` in
input pixels, zero rows at the end (spec §6); images ``(B, S, S, 3)`` float32
ImageNet-normalised RGB (spec §8.7).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from asff_jax.data import synthetic
from asff_jax.data import transforms as T

#: Official random-shape set: 32 * randint(10, 19) = 320..608 (spec §7).
DEFAULT_SIZES = tuple(range(320, 609, 32))


# --------------------------------------------------------------------------- #
# Schedules
# --------------------------------------------------------------------------- #


def input_size_at(step, *, seed=0, sizes=DEFAULT_SIZES, resize_every=10, first_size=608,
                  final_size=608, fixed_from=None, random_resize=True):
  """Input side ``S`` (int) at global ``step``: a pure function of ``(seed, step // resize_every)``.

  Official (spec §7): every 10 iterations ``S = 32 * randint(10, 19)``; training
  starts at 608; fixed at ``final_size`` for the last epochs (``fixed_from`` =
  first step of that phase, ``None`` = never). ``random_resize=False`` always
  returns ``final_size``.
  """
  step = int(step)
  if not random_resize or (fixed_from is not None and step >= fixed_from):
    return int(final_size)
  block = step // int(resize_every)
  if block == 0 and first_size is not None:
    return int(first_size)
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5A5E, block])
  return int(sizes[int(rng.integers(len(sizes)))])


def mixup_at(step, *, enabled=True, off_from=None):
  """Whether mixup is on at global ``step`` (spec §7: off for the last 30 epochs)."""
  return bool(enabled) and (off_from is None or int(step) < off_from)


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
  """Schedule config for the input pipeline; the training loop sets the step boundaries.

  Attributes:
    seed: seed of the random-shape draws.
    sizes: candidate input sides (pixels).
    resize_every: steps per random-shape block (official 10).
    first_size: side of the first block (official 608; ``None`` = random).
    final_size: side of the fixed final phase / when ``random_resize`` is off.
    fixed_size_from: first step of the fixed-size phase (``None`` = never).
    random_resize: cfg RANDRESIZE.
    mixup: cfg MIX.
    mixup_off_from: first step without mixup (``None`` = never).
  """

  seed: int = 0
  sizes: Sequence[int] = DEFAULT_SIZES
  resize_every: int = 10
  first_size: int | None = 608
  final_size: int = 608
  fixed_size_from: int | None = None
  random_resize: bool = True
  mixup: bool = True
  mixup_off_from: int | None = None

  def input_size_at(self, step) -> int:
    """See module-level :func:`input_size_at`."""
    return input_size_at(step, seed=self.seed, sizes=self.sizes, resize_every=self.resize_every,
                         first_size=self.first_size, final_size=self.final_size,
                         fixed_from=self.fixed_size_from, random_resize=self.random_resize)

  def mixup_at(self, step) -> bool:
    """See module-level :func:`mixup_at`."""
    return mixup_at(step, enabled=self.mixup, off_from=self.mixup_off_from)


# --------------------------------------------------------------------------- #
# Index scheme (pure functions of seed, step, position)
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed, epoch, n):
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xE90C, int(epoch)]).permutation(n)


def example_index(seed, step, pos, global_batch_size, n):
  """Source index of position ``pos`` of global step ``step`` (per-epoch permutation)."""
  g = int(step) * int(global_batch_size) + int(pos)
  return int(_epoch_permutation(int(seed), g // n, n)[g % n])


def example_randomness(seed, step, pos, index, n):
  """``(partner_index, aug_seed (2,) int32)`` for position ``pos`` of step ``step``.

  The partner is uniform over the other ``n - 1`` examples (itself if n == 1).
  """
  ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xA06, int(step), int(pos)])
  words = ss.generate_state(3, dtype=np.uint32)
  partner = index if n <= 1 else (index + 1 + int(words[0] % (n - 1))) % n
  return partner, words[1:].view(np.int32).copy()


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel  (lazy: the pipeline itself does not need jax)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def _pad_boxes(boxes, classes, k):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[:k]
  classes = np.asarray(classes, np.int32).reshape(-1)[:k]
  n = len(boxes)
  out_b = np.zeros((k, 4), np.float32)
  out_c = np.zeros((k,), np.int32)
  out_b[:n], out_c[:n] = boxes, classes
  return out_b, out_c, np.int32(n)


def decode(data, fast=False):
  """Encoded JPEG/PNG/... bytes -> ``(H, W, 3)`` uint8 RGB.

  ``fast=True`` decodes JPEGs with ``dct_method='INTEGER_FAST'`` (~40% faster,
  pixel differences of a few grey levels; used for training only).
  """
  if fast:
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_FAST"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  else:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return tf.ensure_shape(image, (None, None, 3))


def _options(threads, deterministic=True):
  opts = tf.data.Options()
  opts.deterministic = deterministic
  opts.autotune.enabled = True
  if threads is not None:
    opts.threading.private_threadpool_size = int(threads)
    opts.threading.max_intra_op_parallelism = 1
  return opts


# --------------------------------------------------------------------------- #
# Training iterator
# --------------------------------------------------------------------------- #


def train_dataset(source, *, seed, global_batch_size, start_step=0, size_schedule=608,
                  mixup_schedule=True, max_boxes=50, max_raw_boxes=100, process_index=None,
                  process_count=None, num_steps=None, threads=None, prefetch=2,
                  fast_decode=True, augment=None):
  """The ``tf.data.Dataset`` behind :func:`train_batches` (same arguments).

  Elements: ``{'images': (B_local, S, S, 3) f32, 'labels': (B_local, max_boxes, 6) f32,
  'step': (B_local,) int64}``.
  """
  pi, pc = _process_info(process_index, process_count)
  b = int(global_batch_size)
  if b % pc:
    raise ValueError(f"global_batch_size {b} not divisible by process_count {pc}")
  bl = b // pc
  n = len(source)
  k = int(max_raw_boxes)
  size_fn = size_schedule if callable(size_schedule) else (lambda s, v=int(size_schedule): v)
  mix_fn = mixup_schedule if callable(mixup_schedule) else (lambda s, v=bool(mixup_schedule): v)
  seed = int(seed)
  augment = dict(augment or {})
  empty = (b"", np.zeros((k, 4), np.float32), np.zeros((k,), np.int32), np.int32(0))

  def read(e):
    e = int(e)
    step = int(start_step) + e // bl
    pos = pi * bl + e % bl
    idx = example_index(seed, step, pos, b, n)
    partner, aug = example_randomness(seed, step, pos, idx, n)
    mix = bool(mix_fn(step)) and n > 1

    def load(i):
      ex = source[i]
      return (ex["image"],) + _pad_boxes(ex["boxes"], ex["classes"], k)

    first = load(idx)
    second = load(partner) if mix else empty
    return (*first, *second, np.int32(size_fn(step)), np.bool_(mix), aug, np.int64(step))

  tout = [tf.string, tf.float32, tf.int32, tf.int32] * 2 + [tf.int32, tf.bool, tf.int32, tf.int64]

  @tf.autograph.experimental.do_not_convert
  def make_example(e):
    out = tf.numpy_function(read, [e], tout, stateful=False)
    data1, boxes1, cls1, n1, data2, boxes2, cls2, n2, size, mix, aug, step = out
    boxes1 = tf.ensure_shape(boxes1, (k, 4))
    boxes2 = tf.ensure_shape(boxes2, (k, 4))
    cls1, cls2 = tf.ensure_shape(cls1, (k,)), tf.ensure_shape(cls2, (k,))
    valid1 = tf.range(k) < n1
    valid2 = tf.range(k) < n2
    aug = tf.ensure_shape(aug, (2,))
    s_mix, s_tf = T.split_seed(aug, 2)
    image1 = decode(data1, fast_decode)

    def with_mix():
      im, bx, cl, wt, vd, _ = T.mixup(image1, boxes1, cls1, valid1, decode(data2, fast_decode), boxes2, cls2,
                                      valid2, s_mix)
      return im, bx, cl, wt, vd

    def no_mix():
      return (image1, tf.concat([boxes1, tf.zeros((k, 4))], 0),
              tf.concat([cls1, tf.zeros((k,), tf.int32)], 0), tf.ones((2 * k,)),
              tf.concat([valid1, tf.zeros((k,), tf.bool)], 0))

    image, boxes, classes, weights, valid = tf.cond(mix, with_mix, no_mix)
    image = tf.ensure_shape(image, (None, None, 3))
    boxes = tf.ensure_shape(boxes, (2 * k, 4))
    classes, weights, valid = (tf.ensure_shape(x, (2 * k,)) for x in (classes, weights, valid))
    image, labels = T.train_transform(image, boxes, classes, weights, valid, s_tf, size,
                                      max_boxes=max_boxes, **augment)
    return {"images": image, "labels": labels, "step": step}

  stop = None if num_steps is None else int(num_steps) * bl
  ds = tf.data.Dataset.range(stop if stop is not None else np.iinfo(np.int64).max)
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(bl, drop_remainder=True)
  ds = ds.prefetch(prefetch)
  return ds.with_options(_options(threads))


def train_batches(source, *, seed, global_batch_size, start_step=0, size_schedule=608,
                  mixup_schedule=True, max_boxes=50, max_raw_boxes=100, process_index=None,
                  process_count=None, num_steps=None, threads=None, prefetch=2,
                  fast_decode=True, augment=None) -> Iterator[dict]:
  """Per-process training batches, a pure function of ``(seed, step)`` (spec §7-§8).

  Args:
    source: random-access source (``len``, ``source[i]`` -> dict with
      ``'image'`` encoded bytes, ``'boxes'`` (N, 4) xyxy pixels, ``'classes'``
      (N,) int32, ``'is_crowd'`` (N,) bool, ...), see :mod:`asff_jax.data.sources`.
    seed: int, the data seed (permutation, partners, augmentation, sizes are
      all derived from it; the size schedule has its own seed if it is a
      :class:`TrainSchedule`).
    global_batch_size: images per step over all processes (B).
    start_step: first global step produced (resume point).
    size_schedule: ``step -> S`` callable (e.g. ``TrainSchedule.input_size_at``)
      or a fixed int.
    mixup_schedule: ``step -> bool`` callable (e.g. ``TrainSchedule.mixup_at``)
      or a fixed bool.
    max_boxes: label rows per image (official 50).
    max_raw_boxes: per-image cap on source boxes carried through augmentation
      (COCO's maximum is 93 including crowd; excess boxes are dropped).
    process_index, process_count: default ``jax.process_index()/process_count()``.
    num_steps: stop after this many steps (default: infinite).
    threads: ``private_threadpool_size`` (None = TF default; 1 = single core).
    prefetch: batches to prefetch.
    fast_decode: decode JPEGs with the fast integer DCT (see :func:`decode`).
    augment: keyword overrides of :func:`asff_jax.data.transforms.train_transform`
      (``flip_p``, ``expand_p``, ``expand_max_scale``, ``affine_p``, ``min_size``);
      None = official.

  Yields:
    ``{'images': (B/P, S, S, 3) float32, 'labels': (B/P, max_boxes, 6) float32,
    'step': int}`` (numpy), rows ``[p*B/P, (p+1)*B/P)`` of the global batch.
  """
  ds = train_dataset(source, seed=seed, global_batch_size=global_batch_size,
                     start_step=start_step, size_schedule=size_schedule,
                     mixup_schedule=mixup_schedule, max_boxes=max_boxes,
                     max_raw_boxes=max_raw_boxes, process_index=process_index,
                     process_count=process_count, num_steps=num_steps, threads=threads,
                     prefetch=prefetch, fast_decode=fast_decode, augment=augment)
  for batch in ds.as_numpy_iterator():
    yield {"images": batch["images"], "labels": batch["labels"], "step": int(batch["step"][0])}


# --------------------------------------------------------------------------- #
# Evaluation iterator
# --------------------------------------------------------------------------- #


def eval_dataset(source, *, size, batch_size, process_index=None, process_count=None,
                 threads=None, prefetch=2):
  """The ``tf.data.Dataset`` behind :func:`eval_batches` (same arguments)."""
  pi, pc = _process_info(process_index, process_count)
  b = int(batch_size)
  if b % pc:
    raise ValueError(f"batch_size {b} not divisible by process_count {pc}")
  bl = b // pc
  n = len(source)
  num_batches = -(-n // b)

  def read(e):
    e = int(e)
    g = (e // bl) * b + pi * bl + e % bl
    ok = g < n
    ex = source[g if ok else 0]
    iid = int(ex["image_id"]) if ok else -1
    return ex["image"], np.int64(iid), np.bool_(ok)

  @tf.autograph.experimental.do_not_convert
  def make_example(e):
    data, iid, ok = tf.numpy_function(read, [e], [tf.string, tf.int64, tf.bool], stateful=False)
    image = decode(data)
    hw = tf.shape(image)[:2]
    image = T.val_transform(image, size)
    image = tf.ensure_shape(image, (size, size, 3))
    return {"images": image, "image_ids": tf.ensure_shape(iid, ()),
            "orig_hw": tf.cast(hw, tf.int32), "valid": tf.ensure_shape(ok, ())}

  ds = tf.data.Dataset.range(num_batches * bl)
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(bl, drop_remainder=True).prefetch(prefetch)
  return ds.with_options(_options(threads))


def eval_batches(source, *, size, batch_size, process_index=None, process_count=None,
                 threads=None, prefetch=2) -> Iterator[dict]:
  """Evaluation batches (spec §5): plain bilinear resize to ``size`` + normalisation.

  The dataset order is padded to a multiple of the *global* ``batch_size``;
  process ``p`` of ``P`` gets rows ``[p*b/P, (p+1)*b/P)`` of each global batch.

  Yields:
    ``{'images': (b, S, S, 3) float32, 'image_ids': (b,) int64 (-1 for padding),
    'orig_hw': (b, 2) int32 original (height, width), 'valid': (b,) bool}``
    with ``b = batch_size / P``; padded rows repeat example 0's pixels and have
    ``valid = False``. Predicted boxes map back to the original image by
    ``x * W / S``, ``y * H / S``.
  """
  ds = eval_dataset(source, size=size, batch_size=batch_size, process_index=process_index,
                    process_count=process_count, threads=threads, prefetch=prefetch)
  yield from ds.as_numpy_iterator()


# --------------------------------------------------------------------------- #
# Throughput
# --------------------------------------------------------------------------- #


def measure_throughput(source=None, *, size=608, mixup=True, batch_size=8, num_batches=25,
                       warmup_batches=3, threads=1, seed=0, fast_decode=True):
  """Training-augmentation throughput of the full pipeline (spec item 8).

  Times :func:`train_batches` (JPEG decode of both mixup images, mixup, full
  TrainTransform at ``size``, batching) with ``threads`` tf.data threads
  (``threads=1``: ``private_threadpool_size=1`` and intra-op parallelism 1, i.e.
  the per-core rate). ``source`` defaults to a :class:`SyntheticSource` of 16
  640x480 JPEGs. ``threads=None`` uses all cores (TF default pool).

  Returns:
    dict with ``images_per_s`` (wall clock) and ``images_per_cpu_s`` (images per
    CPU-second of this process, all threads: the per-core rate, robust to other
    load on the machine), their inverses ``per_image_ms`` / ``cpu_ms_per_image``,
    and ``images, seconds, cpu_seconds, threads, size, mixup``.
  """
  source = synthetic.SyntheticSource(16) if source is None else source
  it = train_batches(source, seed=seed, global_batch_size=batch_size, size_schedule=size,
                     mixup_schedule=mixup, process_index=0, process_count=1, threads=threads,
                     prefetch=1, num_steps=warmup_batches + num_batches, fast_decode=fast_decode)
  for _ in range(warmup_batches):
    next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  count = 0
  for batch in it:
    count += batch["images"].shape[0]
  dt, dc = time.perf_counter() - t0, time.process_time() - c0
  return {"images_per_s": count / dt, "images_per_cpu_s": count / dc,
          "per_image_ms": 1e3 * dt / count, "cpu_ms_per_image": 1e3 * dc / count,
          "images": count, "seconds": dt, "cpu_seconds": dc, "threads": threads, "size": size,
          "mixup": mixup}
