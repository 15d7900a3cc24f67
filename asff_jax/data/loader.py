"""Config → data: the dataset sources of a run and its training iterator.

Glue between a full config (:mod:`asff_jax.config`) and
:mod:`asff_jax.data.sources` / :mod:`asff_jax.data.pipeline`. Keys read here
(``config.dataset.<key>``): ``input_size`` (the final, fixed-phase training
side and the default evaluation side), ``random_resize``, ``sizes``,
``resize_every``, ``first_size``, ``fixed_size_epochs``, ``mixup``,
``no_mixup_epochs``, ``max_boxes``, ``max_raw_boxes``, ``threads`` and
``augment`` (strengths of :func:`asff_jax.data.transforms.train_transform`).
"""

from __future__ import annotations

from typing import Iterator, Optional

from asff_jax import config as config_lib
from asff_jax.data import coco_folder, pipeline
from asff_jax.data.sources import open_source


def train_source(config):
  """The training split's source (prepared on first use)."""
  return open_source(config.dataset, config.dataset.train_split, num_classes=config.model.num_classes)


def eval_source(config):
  """The evaluation split's source (prepared on first use)."""
  return open_source(config.dataset, config.dataset.eval_split, num_classes=config.model.num_classes)


def dataset_info(source) -> dict:
  """The facts :func:`asff_jax.config.resolve_config` records from a training source."""
  return {"num_train_examples": len(source), "class_names": list(source.class_names),
          "category_ids": list(source.category_ids)}


def crowding_message(source, config) -> Optional[str]:
  """A warning when training images have more boxes than the per-image caps keep, else None.

  The caps are ``dataset.max_raw_boxes`` (source boxes carried through
  augmentation) and ``dataset.max_boxes`` (label rows after it); boxes beyond
  ``min`` of the two are dropped (spec §8: the official loader keeps 50). The
  counts come from the preparation report's boxes-per-image histogram
  (``coco_folder`` and ``digits`` sources; other sources give None).
  """
  report = getattr(source, "report", None) or {}
  counts = coco_folder.boxes_per_image(report)
  cap = min(int(config.dataset.max_boxes), int(config.dataset.max_raw_boxes))
  if counts is None:
    return None
  c = coco_folder.crowding(counts, cap)
  if not c["images"]:
    return None
  return (f"{c['images']} of {int(counts.sum())} training images have more than {cap} boxes "
          f"(dataset.max_boxes={int(config.dataset.max_boxes)}, dataset.max_raw_boxes="
          f"{int(config.dataset.max_raw_boxes)}): {c['boxes_dropped']} boxes are dropped per epoch, "
          f"the largest image has {c['largest']}; --config.dataset.max_boxes={c['largest']} "
          f"--config.dataset.max_raw_boxes={c['largest']} keeps them all (the loss then costs more "
          "per step); see README 'Crowded scenes'")


def train_schedule(config) -> pipeline.TrainSchedule:
  """The input-size / mixup schedule of a *resolved* config (step boundaries from epochs).

  With E = ``steps_per_epoch`` · :func:`asff_jax.config.schedule_scale` and T =
  ``num_train_steps``: sizes are fixed to ``dataset.input_size`` from step
  ``T − fixed_size_epochs·E`` and mixup is off from step ``T −
  (no_mixup_epochs − 1)·E`` (official: epoch 291 and 272 of 301). Zero epochs
  disables the phase.
  """
  d = config.dataset
  e = int(config.steps_per_epoch) * config_lib.schedule_scale(config)
  t = int(config.num_train_steps)
  fixed_epochs, no_mix_epochs = int(d.fixed_size_epochs), int(d.no_mixup_epochs)
  return pipeline.TrainSchedule(
      seed=int(config.seed),
      sizes=tuple(int(s) for s in d.sizes),
      resize_every=int(d.resize_every),
      first_size=None if d.first_size is None else int(d.first_size),
      final_size=int(d.input_size),
      fixed_size_from=max(t - round(fixed_epochs * e), 0) if fixed_epochs > 0 else None,
      random_resize=bool(d.random_resize),
      mixup=bool(d.mixup),
      mixup_off_from=max(t - round((no_mix_epochs - 1) * e), 0) if no_mix_epochs > 0 else None)


def augment_kwargs(config) -> dict:
  """``dataset.augment`` as keyword arguments of ``train_transform``."""
  return {k: float(v) for k, v in config.dataset.augment.to_dict().items() if v is not None}


def make_train_iterator(config, start_step: int, source=None) -> Iterator[dict]:
  """This process's training batches from global step ``start_step`` on (resolved config).

  Yields ``{'images': (B/P, S, S, 3) float32, 'labels': (B/P, max_boxes, 6)
  float32}`` where S follows :func:`train_schedule`; a pure function of
  ``(config.seed, step)`` (see :mod:`asff_jax.data.pipeline`).

  Raises:
    ConfigError: unknown source, or ``model.num_classes`` not matching the data.
  """
  source = train_source(config) if source is None else source
  config_lib.check_num_classes(config, source.num_classes, where=f"dataset {source.name!r} split "
                               f"{source.split!r}")
  schedule = train_schedule(config)
  d = config.dataset
  it = pipeline.train_batches(
      source, seed=int(config.seed), global_batch_size=int(config.batch_size),
      start_step=int(start_step), size_schedule=schedule.input_size_at,
      mixup_schedule=schedule.mixup_at, max_boxes=int(d.max_boxes),
      max_raw_boxes=int(d.max_raw_boxes), threads=d.threads, augment=augment_kwargs(config))
  for batch in it:
    yield {"images": batch["images"], "labels": batch["labels"]}


def eval_input_size(config) -> int:
  """Evaluation side: ``eval.input_size`` or ``dataset.input_size``."""
  return int(config.eval.input_size or config.dataset.input_size)
