"""Config → data: the training iterator and the evaluation hook used by ``asff_jax.train``.

Glue between a full training config (:func:`asff_jax.train.default_config`)
and :mod:`asff_jax.data.sources` / :mod:`asff_jax.data.pipeline`.

Config keys read here (``config.dataset.<key>``, besides the source keys of
:mod:`asff_jax.data.sources`):

* ``input_size``: the final (fixed-phase) training side and the default
  evaluation side (official 608).
* ``random_resize`` (True), ``sizes`` (320..608 step 32), ``resize_every``
  (10 steps), ``first_size`` (608; None = random from the start),
  ``fixed_size_epochs`` (10: sizes are fixed to ``input_size`` for the last 10
  of the official 301 epochs, spec §7 "epochs > 290").
* ``mixup`` (True), ``no_mixup_epochs`` (30: official switch-off at epoch
  272 of 0..300, i.e. the last 29 epochs; spec §7).
* ``max_boxes`` (50), ``max_raw_boxes`` (100), ``threads`` (None = all cores),
  ``augment``: overrides of :func:`asff_jax.data.transforms.train_transform`
  strengths (``flip_p``, ``expand_p``, ``expand_max_scale``, ``affine_p``).

Evaluation keys (``config.eval.<key>``): ``input_size`` (default
``dataset.input_size``), ``batch_size`` (8), ``conf_thre`` / ``nms_thre`` /
``pre_nms_topk`` / ``max_detections`` (:func:`asff_jax.inference.eval_settings`),
``max_images`` (0 = the whole split; > 0 = the first N images, a quick
periodic estimate during training), ``use_ema`` (True: evaluate the EMA
parameters when the state has them).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator, Optional

import jax
import numpy as np

from asff_jax.data import pipeline
from asff_jax.data.sources import open_source

#: ``dataset.source`` values served by :mod:`asff_jax.data.sources`.
REAL_SOURCES = ("digits", "coco_folder", "coco_tfds")


def _get(cfg, key, default):
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None and default is not None else value


def train_source(config):
  """The training split's :class:`~asff_jax.data.sources.DatasetSource` (created on first use)."""
  return open_source(config.dataset, _get(config.dataset, "train_split", "train"))


def eval_source(config):
  """The evaluation split's :class:`~asff_jax.data.sources.DatasetSource`."""
  return open_source(config.dataset, _get(config.dataset, "eval_split", "val"))


def check_num_classes(config, source) -> None:
  """Raises ``ValueError`` if ``model.num_classes`` disagrees with the dataset's categories."""
  if int(config.model.num_classes) != int(source.num_classes):
    raise ValueError(
        f"model.num_classes={config.model.num_classes} but dataset {source.name!r} split "
        f"{source.split!r} has {source.num_classes} categories (ids {source.category_ids[:5]}...); "
        f"set --config.model.num_classes={source.num_classes}")


def train_schedule(config) -> pipeline.TrainSchedule:
  """The input-size / mixup schedule of a *resolved* config (step boundaries from epochs).

  With E = ``steps_per_epoch`` and T = ``num_train_steps``: sizes are fixed to
  ``dataset.input_size`` from step ``T − fixed_size_epochs·E`` and mixup is off
  from step ``T − (no_mixup_epochs − 1)·E`` (official: epoch 291 and 272 of
  301). Zero epochs disables the phase.
  """
  d = config.dataset
  e, t = int(config.steps_per_epoch), int(config.num_train_steps)
  fixed_epochs = int(_get(d, "fixed_size_epochs", 10))
  no_mix_epochs = int(_get(d, "no_mixup_epochs", 30))
  first = _get(d, "first_size", 608)
  return pipeline.TrainSchedule(
      seed=int(config.seed),
      sizes=tuple(int(s) for s in _get(d, "sizes", pipeline.DEFAULT_SIZES)),
      resize_every=int(_get(d, "resize_every", 10)),
      first_size=None if first is None else int(first),
      final_size=int(d.input_size),
      fixed_size_from=max(t - fixed_epochs * e, 0) if fixed_epochs > 0 else None,
      random_resize=bool(_get(d, "random_resize", True)),
      mixup=bool(_get(d, "mixup", True)),
      mixup_off_from=max(t - (no_mix_epochs - 1) * e, 0) if no_mix_epochs > 0 else None)


def augment_kwargs(config) -> dict:
  """``dataset.augment`` as keyword arguments of ``train_transform`` (empty = official)."""
  aug = _get(config.dataset, "augment", None)
  if aug is None:
    return {}
  aug = aug.to_dict() if hasattr(aug, "to_dict") else dict(aug)
  return {k: float(v) for k, v in aug.items() if v is not None}


def make_train_iterator(config, start_step: int, source=None) -> Iterator[dict]:
  """This process's training batches from global step ``start_step`` on (resolved config).

  Yields ``{'images': (B/P, S, S, 3) float32, 'labels': (B/P, max_boxes, 6)
  float32}`` where S follows :func:`train_schedule`; a pure function of
  ``(config.seed, step)`` (see :mod:`asff_jax.data.pipeline`).

  Raises:
    ValueError: unknown source, or ``model.num_classes`` not matching the data.
  """
  source = train_source(config) if source is None else source
  check_num_classes(config, source)
  schedule = train_schedule(config)
  d = config.dataset
  it = pipeline.train_batches(
      source, seed=int(config.seed), global_batch_size=int(config.batch_size),
      start_step=int(start_step), size_schedule=schedule.input_size_at,
      mixup_schedule=schedule.mixup_at, max_boxes=int(_get(d, "max_boxes", 50)),
      max_raw_boxes=int(_get(d, "max_raw_boxes", 100)), threads=_get(d, "threads", None),
      drop_crowd=not bool(_get(d, "use_crowd", True)), augment=augment_kwargs(config))
  for batch in it:
    yield {"images": batch["images"], "labels": batch["labels"]}


def num_train_examples(config) -> int:
  """Number of training images of the configured source (prepares it on first use)."""
  return len(train_source(config))


def eval_input_size(config) -> int:
  """Evaluation side: ``eval.input_size`` or ``dataset.input_size``."""
  ev = config.get("eval", None)
  size = ev.get("input_size", None) if ev is not None else None
  return int(size or config.dataset.input_size)


class _FirstN:
  """Random-access view of the first ``n`` records of a source."""

  def __init__(self, source, n):
    self._source, self._n = source, min(int(n), len(source))

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= int(i) < self._n:
      raise IndexError(i)
    return self._source[i]


def evaluate_variables(config, variables, *, model=None, source=None, size=None,
                       max_images=None, log=print, out_dir=None, tag=None) -> dict:
  """COCO evaluation of ``variables`` on the eval split (spec §5: plain resize, NMS, pycocotools).

  Args:
    config: full config (``dataset``, ``model``, ``eval`` sections).
    variables: ``{'params', 'batch_stats'}`` (host or device arrays).
    model: the Flax model (default ``create_model(config)``).
    source: eval source (default :func:`eval_source`).
    size: input side (default :func:`eval_input_size`).
    max_images: evaluate only the first N images (None → ``eval.max_images``, 0 = all).
    out_dir: if given, writes ``<split>_metrics.json`` and
      ``<split>_results.json`` (COCO results format) there.
    tag: extra JSON field stored with the metrics (e.g. the checkpoint step).

  Returns:
    ``{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', ...,
    'num_images', 'images_per_s', 'AP_agnostic', 'AP50_agnostic'}``; the last
    two score the same detections class-agnostically (pycocotools
    ``useCats=0``: any category's box can be matched), i.e. localisation only.
  """
  from asff_jax import inference  # pylint: disable=import-outside-toplevel
  from asff_jax.coco_eval import CocoEvaluator  # pylint: disable=import-outside-toplevel
  from asff_jax.models import create_model  # pylint: disable=import-outside-toplevel

  model = create_model(config) if model is None else model
  source = eval_source(config) if source is None else source
  check_num_classes(config, source)
  size = eval_input_size(config) if size is None else int(size)
  ev = config.get("eval", None)
  if max_images is None:
    max_images = int(ev.get("max_images", 0) or 0) if ev is not None else 0
  evaluator = CocoEvaluator(source.eval_gt)
  view = _FirstN(source, max_images) if max_images else source
  batch_size = int(ev.get("batch_size", 8) or 8) if ev is not None else 8
  # Evaluation runs on this process's first device with the whole eval set
  # (single-host; in multi-host runs every process evaluates redundantly).
  device = jax.local_devices()[0]
  variables = jax.device_put(jax.tree.map(np.asarray, _host(variables)), device)
  predict = inference.make_predict_fn(model, **inference.eval_settings(config))
  batches = pipeline.eval_batches(view, size=size, batch_size=batch_size, process_index=0,
                                  process_count=1)
  metrics = inference.run_coco_eval(predict, variables, batches, evaluator, input_size=size,
                                    log=log)
  # Localisation alone (pycocotools useCats=0): separates box quality from classification.
  agnostic = evaluator.evaluate(image_ids=evaluator.image_ids, class_agnostic=True)
  metrics.update(AP_agnostic=agnostic["AP"], AP50_agnostic=agnostic["AP50"])
  if out_dir is not None and jax.process_index() == 0:
    split = source.split
    os.makedirs(out_dir, exist_ok=True)
    evaluator.write_results(os.path.join(out_dir, f"{split}_results.json"))
    record = {k: float(v) for k, v in metrics.items()}
    record.update(split=split, input_size=size, dataset=str(source.name))
    if tag is not None:
      record["tag"] = tag
    tmp = os.path.join(out_dir, f"{split}_metrics.json.tmp")
    with open(tmp, "w") as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, f"{split}_metrics.json"))
  return metrics


def _host(tree):
  from asff_jax import sharding  # pylint: disable=import-outside-toplevel
  return sharding.to_host(tree)


def make_evaluate_fn(config, workdir: Optional[str] = None, log=logging.info):
  """``evaluate_fn(state, step) -> {'eval/AP', ...}`` for :func:`asff_jax.train.train_and_evaluate`.

  Evaluates ``state.ema_params`` when ``eval.use_ema`` and the state has an EMA,
  else ``state.params``; on ``eval.max_images`` images, except at the last step
  (``num_train_steps`` of the resolved config), which uses the whole split; writes ``workdir/eval/<split>_metrics.json`` (the
  latest evaluation) and appends a line to ``workdir/eval/history.jsonl``.
  """
  source = eval_source(config)
  check_num_classes(config, source)
  from asff_jax.models import create_model  # pylint: disable=import-outside-toplevel
  model = create_model(config)
  ev = config.get("eval", None)
  use_ema = bool(ev.get("use_ema", True)) if ev is not None else True

  def evaluate_fn(state, step):
    params = state.ema_params if use_ema and state.ema_params else state.params
    variables = {"params": params, "batch_stats": state.batch_stats}
    out_dir = os.path.join(workdir, "eval") if workdir else None
    final = int(step) >= int(config.get("num_train_steps", -1))
    metrics = evaluate_variables(config, variables, model=model, source=source, out_dir=out_dir,
                                 tag=int(step), log=lambda m: log("%s", m),
                                 max_images=0 if final else None)
    log("eval at step %d on %s/%s (%d images): AP %.4f  AP50 %.4f  AP75 %.4f  APs %.4f  APm %.4f  "
        "APl %.4f  (class-agnostic AP50 %.4f)", step, source.name, source.split, metrics["num_images"],
        metrics["AP"], metrics["AP50"], metrics["AP75"], metrics["APs"], metrics["APm"], metrics["APl"],
        metrics["AP50_agnostic"])
    if out_dir is not None and jax.process_index() == 0:
      with open(os.path.join(out_dir, "history.jsonl"), "a") as f:
        f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    return {f"eval/{k}": float(v) for k, v in metrics.items()}

  return evaluate_fn
