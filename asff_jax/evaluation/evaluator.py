"""COCO evaluation of model variables, of a workdir's checkpoint, and periodically during training.

The official test-time settings (spec §5): plain resize to ``eval.input_size``
(or ``dataset.input_size``), score threshold ``eval.conf_thre`` 0.001,
per-class NMS ``eval.nms_thre`` 0.65, at most ``eval.max_detections`` 100 per
image, scored by pycocotools (:mod:`asff_jax.evaluation.coco_eval`).

What is written (``out_dir``, by default ``WORKDIR/eval``):

* ``<split>_metrics.json``: AP, AP50, AP75, APs, APm, APl, the AR values,
  ``AP_agnostic`` / ``AP50_agnostic`` (the same detections scored with
  pycocotools' ``useCats=0``: localisation alone), the image count and speed,
  the split, dataset, input size and ``tag`` (the step);
* ``<split>_results.json``: the detections in the COCO results format
  (original category ids, ``[x, y, w, h]`` in original pixels);
* during training, one line per evaluation in ``history.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Optional

import jax
import numpy as np

from asff_jax import progress
from asff_jax.config import check_num_classes, load_workdir_config
from asff_jax.data import loader, pipeline
from asff_jax.evaluation import inference
from asff_jax.evaluation.coco_eval import CocoEvaluator
from asff_jax.models import create_model
from asff_jax.training import checkpoints

logger = logging.getLogger("asff_jax")


class FirstN:
  """Random-access view of the first ``n`` records of a source."""

  def __init__(self, source, n):
    self._source, self._n = source, min(int(n), len(source))

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= int(i) < self._n:
      raise IndexError(i)
    return self._source[i]


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def results_file_name(split: str, name: str) -> str:
  """The COCO evaluation server's file name: ``detections_<split>_<name>_results.json``."""
  return f"detections_{split}_{name}_results.json"


def evaluate_variables(config, variables, *, model=None, source=None, size=None,
                       max_images: Optional[int] = None, out_dir: Optional[str] = None,
                       tag=None, show_progress: bool = True, per_class: bool = False) -> dict:
  """COCO evaluation of ``variables`` on the eval split (spec §5: plain resize, NMS, pycocotools).

  Args:
    config: full config (``dataset``, ``model``, ``eval`` sections).
    variables: ``{'params', 'batch_stats'}`` (host or device arrays).
    model: the Flax model (default ``create_model(config)``).
    source: eval source (default :func:`asff_jax.data.loader.eval_source`).
    size: input side (default :func:`asff_jax.data.loader.eval_input_size`).
    max_images: evaluate only the first N images (None → ``eval.max_images``, 0 = all).
    out_dir: if given, writes ``<split>_metrics.json`` (with the per-class AP
      table under ``'per_class'``) and ``<split>_results.json`` there; for an
      images-only split (COCO test-dev: ``image_info_<split>.json``) only the
      results, as ``detections_<split>_<eval.results_name>_results.json``
      (the evaluation server's format: original category ids, ``[x, y, w, h]``
      in original pixels).
    tag: extra JSON field stored with the metrics (e.g. the checkpoint step).
    show_progress: a progress bar / periodic line while images are processed.
    per_class: also return the per-class table
      (:meth:`~asff_jax.evaluation.coco_eval.CocoEvaluator.per_class`) under ``'per_class'``.

  Returns:
    ``{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', ...,
    'num_images', 'images_per_s', 'AP_agnostic', 'AP50_agnostic'}``; for an
    images-only split only ``num_images``, ``images_per_s`` and
    ``'results_file'`` (no metrics: there is no ground truth).

  Raises:
    ConfigError: ``model.num_classes`` disagrees with the dataset.
  """
  model = create_model(config) if model is None else model
  source = loader.eval_source(config) if source is None else source
  check_num_classes(config, source.num_classes, where=f"dataset {source.name!r} split {source.split!r}")
  size = loader.eval_input_size(config) if size is None else int(size)
  max_images = int(config.eval.max_images) if max_images is None else int(max_images)
  evaluator = CocoEvaluator(source.eval_gt)
  view = FirstN(source, max_images) if max_images else source
  # Evaluation runs on this process's first device with the whole eval set
  # (in multi-host runs every process evaluates redundantly).
  variables = jax.device_put(jax.tree.map(np.asarray, variables), jax.local_devices()[0])
  predict = inference.make_predict_fn(model, **inference.eval_settings(config))
  batches = pipeline.eval_batches(view, size=size, batch_size=int(config.eval.batch_size),
                                  process_index=0, process_count=1)
  bar = progress.bar(len(view), f"eval {source.split}", unit="img",
                     enabled=show_progress and jax.process_index() == 0)
  done = [0]

  def advance(n):
    bar.update(n - done[0])
    done[0] = n

  images_only = bool((getattr(source, "report", None) or {}).get("images_only"))
  metrics = inference.run_coco_eval(predict, variables, batches, evaluator, input_size=size,
                                    progress=advance, compute_metrics=not images_only)
  bar.close()
  if images_only:
    path = os.path.join(out_dir or ".", results_file_name(source.split, config.eval.results_name))
    if jax.process_index() == 0:
      evaluator.write_results(path)
    logger.info("%s has no annotations (images only): metrics skipped; %d detections on %d images "
                "written to %s for the evaluation server", source.split, len(evaluator.results()),
                metrics["num_images"], path)
    return dict(metrics, results_file=path)
  table = evaluator.per_class()
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
    record["per_class"] = table
    _write_json(os.path.join(out_dir, f"{split}_metrics.json"), record)
  return dict(metrics, per_class=table) if per_class else metrics


def format_metrics(m: dict) -> str:
  """One line: ``step S: AP 0.4310  AP50 ...`` plus the image count (or the results file of a test split)."""
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP50_agnostic")
  body = "  ".join(f"{k} {m[k]:.4f}" for k in names if k in m)
  if "results_file" in m:
    body = f"no annotations: detections written to {m['results_file']}"
  return f"step {m.get('step', '?')}: {body}  ({int(m.get('num_images', 0))} images)"


def format_per_class(table: list) -> str:
  """The per-class table: ``id  name  AP  AP50  #GT``, one line per category."""
  if not table:
    return ""
  width = max(len(r["name"]) for r in table)
  lines = [f"{'id':>4}  {'class':{width}s}  {'AP':>6}  {'AP50':>6}  {'#GT':>6}"]
  for r in table:
    ap, ap50 = (f"{v:6.3f}" if v >= 0 else "     -" for v in (r["AP"], r["AP50"]))
    lines.append(f"{r['category_id']:>4}  {r['name']:{width}s}  {ap}  {ap50}  {r['num_gt']:>6}")
  return "\n".join(lines)


def make_evaluate_fn(config, workdir: Optional[str] = None) -> Callable:
  """``evaluate_fn(variables, step) -> {'eval/AP', ...}`` for the training loop (:mod:`asff_jax.train`).

  ``variables`` are the host ``{'params', 'batch_stats'}`` to evaluate (the
  loop passes the EMA parameters when ``eval.use_ema`` and the run keeps
  them). Uses ``eval.max_images`` images, except at the last step
  (``num_train_steps`` of the resolved config), which uses the whole split;
  writes ``workdir/eval/<split>_metrics.json`` (the latest evaluation) and
  appends a line to ``workdir/eval/history.jsonl``.
  """
  source = loader.eval_source(config)
  check_num_classes(config, source.num_classes, where=f"dataset {source.name!r} split {source.split!r}")
  model = create_model(config)

  def evaluate_fn(variables, step):
    out_dir = os.path.join(workdir, "eval") if workdir else None
    final = int(step) >= int(config.num_train_steps)
    metrics = evaluate_variables(config, variables, model=model, source=source, out_dir=out_dir,
                                 tag=int(step), max_images=0 if final else None)
    if "AP" not in metrics:  # an images-only eval split: detections written, no metrics
      return {}
    logger.info("eval at step %d on %s/%s (%d images): AP %.4f  AP50 %.4f  AP75 %.4f  APs %.4f  "
                "APm %.4f  APl %.4f  (class-agnostic AP50 %.4f)", step, source.name, source.split,
                metrics["num_images"], metrics["AP"], metrics["AP50"], metrics["AP75"], metrics["APs"],
                metrics["APm"], metrics["APl"], metrics["AP50_agnostic"])
    if out_dir is not None and jax.process_index() == 0:
      with open(os.path.join(out_dir, "history.jsonl"), "a") as f:
        f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    return {f"eval/{k}": float(v) for k, v in metrics.items()}

  return evaluate_fn


def evaluate_workdir(workdir: str, config=None, *, step=None, use_ema=None, out_dir=None) -> dict:
  """Evaluates checkpoint ``step`` of ``workdir``; returns the metrics and writes the JSON files.

  Args:
    workdir: training or convert workdir.
    config: full config (default: the workdir's, merged over the defaults).
    step: checkpoint step (None = latest).
    use_ema: take EMA parameters if present (None = when the config enables EMA).
    out_dir: where to write (default ``workdir/eval``).

  Raises:
    MissingFileError: no workdir config or checkpoint. ConfigError: class-count mismatch.
  """
  config = load_workdir_config(workdir) if config is None else config
  variables, step = checkpoints.load_variables(workdir, step, use_ema=use_ema)
  metrics = evaluate_variables(config, variables, out_dir=out_dir or os.path.join(workdir, "eval"),
                               tag=int(step), max_images=0, per_class=True)
  return dict(metrics, step=int(step))
