"""The config schema (every key, its default and meaning), config files, and resolution.

One place for the whole tree: :func:`default_config` returns every section with
its default — the official recipe of spec §7 on COCO — and each ``configs/*.py``
starts from it. Every key can be overridden on the command line
(``--config.batch_size=32``, ``--config.model.fusion=sum``); the locked tree
refuses unknown keys.

Sections
--------
top level
  ``seed``; ``batch_size`` (global, over all devices and hosts); ``num_epochs``
  (301: the official loop runs epochs 0..300); ``num_train_steps`` (-1 →
  ``num_epochs · steps_per_epoch``); ``steps_per_epoch`` (-1 →
  ``dataset.num_train_examples // batch_size``); ``log_every_steps``;
  ``checkpoint_every_steps``; ``keep_checkpoints``; ``eval_every_steps`` (0 =
  never); ``eval_at_end``; ``max_consecutive_nonfinite``; ``write_tensorboard``;
  ``dropblock_schedule`` ((from_epoch, block sizes of the 3 positions), spec §7)
  and ``dropblock_keep_prob``; ``preemption_sync_every_steps``;
  ``init_rng_impl`` (None = JAX's threefry; ``'rbg'`` compiles the init faster
  on CPU); ``paper_ap`` (documentation: the AP the paper reports, -1 if none).
``dataset``
  the source (:mod:`asff_jax.data.sources`: ``'digits'``, ``'coco_folder'``,
  ``'coco_tfds'``, ``'synthetic'``) and its keys; the training input
  (:mod:`asff_jax.data.loader`: input size, random shape, mixup, box caps,
  augmentation strengths).
``model``
  :func:`asff_jax.models.create_model`: fusion, RFB, DropBlock, anchors,
  width, depth, dtype, deformable-conv formulation.
``loss``
  :mod:`asff_jax.models.losses`: the official settings (label smoothing,
  ignore threshold) and the paper's adjacent-ignore option.
``optimizer`` / ``schedule``
  :mod:`asff_jax.training.optim`: official SGD and LR schedules.
``init``
  start from weights: a checkpoint or official ``.pth``, include/exclude
  regexes, freezing (:mod:`asff_jax.training.warm_start`).
``eval``
  test-time settings (spec §5) and periodic evaluation.
``debug``
  test hooks (NaN injection, per-step sleep).

Resolution
----------
:func:`resolve_config` is pure: given the training split's size and class
list (the training loop opens the dataset; see
:func:`asff_jax.data.loader.dataset_info`), it fills ``steps_per_epoch``,
``num_train_steps``, ``dataset.num_train_examples``, ``dataset.class_names``
and ``dataset.category_ids`` and checks ``model.num_classes``.

Short runs
----------
Phase boundaries (LR burn-in / constant / cosine end, the DropBlock steps, the
mixup switch-off and the fixed-size phase) are written in epochs over a run of
``num_epochs`` epochs. A run shorter than that (``num_train_steps <
num_epochs · steps_per_epoch``, e.g. ``--config.num_train_steps=20``) lays the
same phases out over the run it has: every boundary is multiplied by
:func:`schedule_scale` ``= num_train_steps / (num_epochs · steps_per_epoch)``.
The warm-up of ``schedule.name='warmup_cosine'`` (whose cosine already
follows the run's length) is cut to half the run when it is longer than that,
and the decay of an EMA of the weights to an average over a third of the run
(:func:`ema_decay`).
:func:`schedule_fit_messages` says what was changed (the training loop logs it
once).
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional, Sequence

import ml_collections

from asff_jax.errors import ConfigError, MissingFileError

placeholder = ml_collections.config_dict.placeholder

#: train2017 images with annotations (the official loader's count).
COCO_TRAIN_IMAGES = 117266


def _dataset() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "coco_tfds"  # 'coco_tfds' | 'coco_folder' | 'digits' | 'synthetic'
  d.root = placeholder(str)  # coco_folder: the COCO-layout folder; digits: cache folder
  d.data_dir = placeholder(str)  # TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
  d.train_split = "train"
  d.eval_split = "val"
  d.use_crowd = True  # official: crowd boxes are training targets (always ignore regions in eval)
  d.tfds_name = "coco/2017"  # coco_tfds
  d.eval_gt_json = placeholder(str)  # coco_tfds: the GT json to evaluate against
  d.max_image_side = 4096  # coco_folder / digits preparation: downscale larger images
  d.digits_seed = 0
  d.digits_num_train = 3000
  d.digits_num_val = 500
  d.digits_workers = placeholder(int)  # processes generating digits (None: all cores)
  d.synthetic_num_train = 8  # synthetic: images per split (tests)
  d.synthetic_num_val = 4
  d.synthetic_image_hw = (96, 128)
  d.synthetic_max_objects = 3
  d.synthetic_seed = 0
  d.class_names = ()  # filled in from the training split (evaluate / predict read it)
  d.category_ids = ()
  d.num_train_examples = -1  # -1: the length of the training split
  # training input (asff_jax.data.loader)
  d.input_size = 608
  d.random_resize = True
  d.sizes = tuple(range(320, 609, 32))
  d.resize_every = 10
  d.first_size = 608  # None: random from the start
  d.fixed_size_epochs = 10  # sizes fixed to input_size for the last 10 epochs (official)
  d.mixup = True
  d.no_mixup_epochs = 30  # official: mixup off from epoch 272 of 0..300
  d.max_boxes = 50  # label rows per image (official)
  d.max_raw_boxes = 100  # source boxes carried through augmentation per image
  d.threads = placeholder(int)  # tf.data threads (None: all cores)
  d.augment = ml_collections.ConfigDict(
      {"flip_p": 0.5, "expand_p": 0.5, "expand_max_scale": 4.0, "affine_p": 0.5, "crop_p": 1.0})
  return d


def _model() -> ml_collections.ConfigDict:
  """The official ASFF model (``--asff``, 40.6 AP configuration) at full width.

  * ``num_classes``: 80 for COCO.
  * ``backbone``: ``'darknet53'`` (the paper's models) or ``'mobilenet_v2'``
    (the official ``yolov3_mobilev2.py``: MobileNetV2, ReLU6 neck,
    ``ASFFmobile`` with ``fusion='asff'`` or the mobile baseline with
    ``'none'``, heads without deformable adaption; use ``anchors='yolov3'``,
    as the official mobile heads do; ``stage_blocks``, ``rfb`` and
    ``dcn_formulation`` do not apply).
  * ``fusion``: ``'asff'`` (paper Eq. 1–2), ``'none'`` (official strong
    baseline), ``'sum'`` or ``'concat'`` (paper Table 3 alternatives).
  * ``rfb``: RFB block in each head before the DCN, compress_c 8 (ASFF*).
  * ``dropblock``: enables the DropBlock layers (the schedule passes the block
    sizes and keep probability per step; identity at eval).
  * ``anchors``: ``'official'`` (the YOLOv3 set with the official (121, 240) in
    place of (373, 326), spec §4/§12), ``'yolov3'``, or 9 explicit ``(w, h)``
    pairs in input pixels, small → large (set a list inside
    ``with config.ignore_type():``).
  * ``width``: channel multiplier (1.0 = official; e.g. 0.25 for CPU runs).
  * ``stage_blocks``: Darknet residual blocks per stage (official (1, 2, 8, 8, 4)).
  * ``compress_c``: ASFF weight-conv channels; None → 16, or 8 with RFB.
  * ``dtype``: ``'float32'``, or ``'bfloat16'`` (bf16 compute, float32 params).
  * ``dcn_formulation``: ``'corners'`` or ``'patches'`` — the same deformable
    conv computed two ways (:func:`asff_jax.models.dcn.deform_conv2d`).
  """
  m = ml_collections.ConfigDict()
  m.num_classes = 80
  m.backbone = "darknet53"
  m.fusion = "asff"
  m.rfb = False
  m.dropblock = False
  m.anchors = "official"
  m.width = 1.0
  m.stage_blocks = (1, 2, 8, 8, 4)
  m.compress_c = placeholder(int)
  m.dtype = "float32"
  m.dcn_formulation = "corners"
  return m


def _loss() -> ml_collections.ConfigDict:
  """The official loss settings (spec §6, cfg ``LABAL_SMOOTH`` / ``IGNORETHRE``).

  * ``label_smoothing`` True — positive class target 1 − 1/C, negatives 1/C.
  * ``ignore_thre`` 0.7 — objectness ignored where a prediction's best IoU with a GT exceeds it.
  * ``detach_anchor_targets`` False — the official non-detached wh targets
    (:mod:`asff_jax.models.losses`); True stops that gradient into ``guide_wh``.
  * ``adjacent_ignore_eps`` None — off; a float ≥ 0 enables the paper's Table 2
    adjacent ignore regions (0 = centre location only).
  * ``max_log_scale`` 15.0 — cap on ``tw, th`` and ``guide_wh`` inside the exponentials of the
    box and anchor terms where those terms look (:func:`asff_jax.models.losses.level_loss`):
    identical below it; without it (None in a config file, ``inf`` on the command line: the
    official code) one runaway prediction makes the whole gradient NaN and the step is skipped.
  * ``anchor_weight``, ``iou_weight``, ``l1_weight``, ``obj_weight``,
    ``cls_weight`` 1.0 — multipliers of the components in the total (official: the plain sum).
  """
  l = ml_collections.ConfigDict()
  l.label_smoothing = True
  l.ignore_thre = 0.7
  l.detach_anchor_targets = False
  l.adjacent_ignore_eps = placeholder(float)
  l.max_log_scale = ml_collections.FieldReference(15.0, field_type=float)  # None allowed
  for k in ("anchor", "iou", "l1", "obj", "cls"):
    l[f"{k}_weight"] = 1.0
  return l


def _optimizer() -> ml_collections.ConfigDict:
  """Official SGD (spec §7); see :mod:`asff_jax.training.optim` for every key."""
  o = ml_collections.ConfigDict()
  o.name = "sgd"  # 'sgd' (official) | 'adamw'
  o.lr = 0.001
  o.momentum = 0.9
  o.nesterov = False
  o.weight_decay = 5e-4
  o.weight_decay_on = "all"  # 'all' (official) | 'official_nowd' (--nowd) | 'kernels'
  o.lr_scaling = "none"  # 'none' (official) | 'linear' (lr · batch_size / reference_batch_size)
  o.reference_batch_size = 64
  o.ema_decay = 0.0  # 0 = no EMA (official)
  o.ema_warmup_steps = -1  # τ: decay · (1 − exp(−t/τ)) at update t; 0 = constant; -1 = min(2000, steps/10)
  o.b1 = 0.9  # adamw only
  o.b2 = 0.999  # adamw only
  o.clip_grad_norm = 0.0  # > 0: clip the global gradient norm first (official: off)
  return o


def _schedule() -> ml_collections.ConfigDict:
  """LR schedule (spec §7); boundaries in epochs (see :mod:`asff_jax.training.optim`)."""
  s = ml_collections.ConfigDict()
  s.name = "official"  # 'official' | 'warmup_cosine' | 'constant'
  s.burn_in_epochs = 5
  s.burn_in_power = 4.0
  s.constant_until_epoch = 20
  s.cosine_end_epoch = 270
  s.min_lr = 1e-5
  s.warmup_epochs = 5.0  # 'warmup_cosine' (may be fractional)
  return s


def _init() -> ml_collections.ConfigDict:
  """Start from weights (:mod:`asff_jax.training.warm_start`); step 0 only, a resumed run ignores it.

  * ``checkpoint``: None (fresh init), an official ``.pth`` (converted on the
    fly: the official backbone file ``darknet53_feature_mx.pth`` or a full
    detector), a workdir (its latest checkpoint; EMA params if it kept them)
    or a checkpoint's ``.../checkpoints/<step>/state`` folder.
  * ``include`` / ``exclude``: regexes (``re.search``) over the parameter path
    ``module/.../leaf`` (e.g. ``backbone/``, ``head_\\d/conv``); None = all /
    none. A leaf loads when it is included, not excluded, present in the
    source and of the same shape; the prediction convs of another class count
    load their box and objectness channels and keep fresh class channels.
  * ``freeze``: regex over the same paths; matching parameters get no update
    (zero gradient, no weight decay, unchanged EMA) and the batch norms whose
    ``scale`` matches run in eval mode (running statistics, not updated).
    Independent of ``checkpoint``.
  """
  i = ml_collections.ConfigDict()
  i.checkpoint = placeholder(str)
  i.include = placeholder(str)
  i.exclude = placeholder(str)
  i.freeze = placeholder(str)
  return i


def _eval() -> ml_collections.ConfigDict:
  """Test-time settings (spec §5) and periodic evaluation."""
  e = ml_collections.ConfigDict()
  e.input_size = placeholder(int)  # None: dataset.input_size
  e.batch_size = 8
  e.conf_thre = 0.001  # official eval.py (cfg TEST.CONFTHRE 0.01 is for demos)
  e.nms_thre = 0.65  # official eval.py; the paper says 0.6
  e.pre_nms_topk = 1000  # candidates entering the fixed-size NMS
  e.max_detections = 100  # COCO's cap per image
  e.max_images = 0  # > 0: periodic evaluation on the first N images only
  e.use_ema = True  # evaluate the EMA parameters when the run keeps them
  e.results_name = "asff_jax"  # images-only splits: detections_<split>_<results_name>_results.json
  return e


def default_config() -> ml_collections.ConfigDict:
  """The full config tree with the official recipe's defaults (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64  # global; official: 5 per GPU × 10 GPUs (README) or 16 × 4 (paper)
  c.num_epochs = 301
  c.num_train_steps = -1
  c.steps_per_epoch = -1
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0
  c.eval_at_end = True
  c.max_consecutive_nonfinite = 20
  c.write_tensorboard = True
  c.dropblock_schedule = ((5, (1, 3, 5)), (80, (3, 5, 7)), (150, (7, 7, 7)))
  c.dropblock_keep_prob = 0.9
  c.preemption_sync_every_steps = 10
  c.init_rng_impl = placeholder(str)
  c.paper_ap = -1.0
  c.dataset = _dataset()
  c.model = _model()
  c.loss = _loss()
  c.optimizer = _optimizer()
  c.schedule = _schedule()
  c.init = _init()
  c.eval = _eval()
  c.debug = ml_collections.ConfigDict()
  c.debug.nan_at_steps = ()  # poison the images of these steps with NaN (tests)
  c.debug.sleep_per_step = 0.0  # seconds of host sleep per step (tests of kill/resume)
  return c


def default_model_config() -> ml_collections.ConfigDict:
  """The ``model`` section alone (for :func:`asff_jax.models.create_model`)."""
  return _model()


def default_loss_config() -> ml_collections.ConfigDict:
  """The ``loss`` section alone (for :func:`asff_jax.models.losses.head_loss`)."""
  return _loss()


def coco_recipe(*, fusion: str = "asff", rfb: bool = False, dropblock: bool = False,
                input_size: int = 608, paper_ap: float = -1.0,
                backbone: str = "darknet53") -> ml_collections.ConfigDict:
  """The official COCO training recipe (spec §7) for one model, for ``configs/coco_*.py``.

  * data: TFDS ``coco/2017`` prepared under ``dataset.data_dir`` (or a COCO
    folder: ``dataset.source=coco_folder``, ``root``, ``train_split=train2017``,
    ``eval_split=val2017``); crowd boxes are trained on, as official;
  * random shape 320..``input_size`` every 10 iterations starting at
    ``input_size``, fixed for the last 10 epochs; mixup Beta(1.5, 1.5), off for
    the last 29 epochs;
  * SGD momentum 0.9, LR 0.001 (not scaled with the batch), weight decay 5e-4
    on all parameters; 4th-power burn-in over 5 epochs, constant to epoch 20,
    cosine to 1e-5 at epoch 270, then 1e-5; 301 epochs (0..300);
  * global batch 64 (the paper's 4 GPUs × 16; the official README trains with
    10 × 5 = 50 at the same LR);
  * evaluation every 10 epochs (official ``--eval_interval 10``) with score
    threshold 0.001, NMS 0.65, at most 100 detections per image.

  ``paper_ap``: the COCO AP the paper reports for this model (documentation).
  ``backbone='mobilenet_v2'``: the official MobileNetV2 models, with the YOLOv3
  anchor (373, 326) their heads use (``model.anchors='yolov3'``).
  """
  c = default_config()
  steps_per_epoch = COCO_TRAIN_IMAGES // 64
  c.batch_size = 64
  c.num_epochs = 301
  c.steps_per_epoch = steps_per_epoch
  c.dataset.source = "coco_tfds"
  c.dataset.input_size = input_size
  c.dataset.first_size = input_size
  c.dataset.sizes = tuple(range(320, input_size + 1, 32))
  c.dataset.num_train_examples = COCO_TRAIN_IMAGES
  c.model.backbone = backbone
  if backbone == "mobilenet_v2":
    c.model.anchors = "yolov3"
  c.model.fusion = fusion
  c.model.rfb = rfb
  c.model.dropblock = dropblock
  c.eval_every_steps = 10 * steps_per_epoch
  c.checkpoint_every_steps = steps_per_epoch
  c.paper_ap = float(paper_ap)
  return c


# ----------------------------------------------------------------------------- files


def load_config_file(path) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file such as ``configs/default.py`` (what ``--config`` loads).

  Raises:
    MissingFileError: no such file. ConfigError: the file has no ``get_config``.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise MissingFileError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0] + "_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise ConfigError(f"config file {path} has no get_config()")
  return mod.get_config()


def merge_config(saved, base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """``base`` (default :func:`default_config`) updated with a saved config (dict or ConfigDict).

  Keys the saved config lacks keep their defaults (a workdir from an older
  version gets the new keys); keys the schema no longer has are dropped. The
  result is locked like any config.
  """
  base = default_config() if base is None else ml_collections.ConfigDict(base.to_dict())

  def update(dst, src):
    for k, v in src.items():
      if k not in dst:
        continue
      if isinstance(dst[k], ml_collections.ConfigDict) and isinstance(v, (dict, ml_collections.ConfigDict)):
        update(dst[k], v)
      else:
        with dst.ignore_type():
          dst[k] = v

  update(base, saved.to_dict() if hasattr(saved, "to_dict") else saved)
  base.lock()
  return base


def load_workdir_config(workdir) -> ml_collections.ConfigDict:
  """The resolved config saved as ``workdir/config.json``, merged over the defaults.

  Raises:
    MissingFileError: the workdir has no ``config.json``.
  """
  path = os.path.join(os.fspath(workdir), "config.json")
  if not os.path.exists(path):
    raise MissingFileError(f"{path} not found: is {os.fspath(workdir)!r} a training or convert workdir?")
  with open(path) as f:
    return merge_config(json.load(f))


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """JSON-safe plain dict of ``config`` (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def write_config_json(config: ml_collections.ConfigDict, path) -> None:
  """Writes ``config`` as indented JSON to ``path`` atomically (temporary file, then rename)."""
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- resolution


def resolve_config(config: ml_collections.ConfigDict, *, num_train_examples: Optional[int] = None,
                   class_names: Optional[Sequence[str]] = None,
                   category_ids: Optional[Sequence[int]] = None) -> ml_collections.ConfigDict:
  """A copy with ``steps_per_epoch``, ``num_train_steps`` and the dataset facts made concrete.

  Pure (opens no dataset). Args:
    config: a full config (:func:`default_config` tree).
    num_train_examples: the training split's length (used when
      ``dataset.num_train_examples`` ≤ 0).
    class_names, category_ids: the training split's classes (sorted category
      ids and their names); recorded in ``dataset`` and checked against
      ``model.num_classes``.

  Raises:
    ConfigError: steps cannot be derived or are not positive, or the class
      count disagrees with the dataset (the message gives the right value).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  d = config.dataset
  if category_ids is not None:
    check_num_classes(config, len(category_ids), where=f"dataset {d.root or d.source!r} split "
                      f"{d.train_split!r}")
    d.class_names = tuple(str(n) for n in class_names)
    d.category_ids = tuple(int(c) for c in category_ids)
  if int(d.num_train_examples) <= 0 and num_train_examples is not None:
    d.num_train_examples = int(num_train_examples)
  if int(config.steps_per_epoch) <= 0:
    if int(d.num_train_examples) <= 0:
      raise ConfigError("steps_per_epoch cannot be derived: set dataset.num_train_examples or "
                        "steps_per_epoch")
    config.steps_per_epoch = int(d.num_train_examples) // int(config.batch_size)
  if config.steps_per_epoch <= 0:
    raise ConfigError(f"steps_per_epoch resolved to {config.steps_per_epoch}: the training split has "
                      f"{d.num_train_examples} images, fewer than batch_size={config.batch_size}")
  if int(config.num_train_steps) <= 0:
    config.num_train_steps = int(config.num_epochs) * int(config.steps_per_epoch)
  if config.num_train_steps <= 0:
    raise ConfigError(f"num_train_steps resolved to {config.num_train_steps}: set "
                      "--config.num_train_steps=N (N > 0)")
  config.lock()
  return config


def check_num_classes(config, num_categories: int, where: str = "the dataset") -> None:
  """Raises :class:`ConfigError` if ``model.num_classes`` is not ``num_categories``."""
  if int(config.model.num_classes) != int(num_categories):
    raise ConfigError(f"model.num_classes={config.model.num_classes} but {where} has "
                      f"{num_categories} categories: set --config.model.num_classes={num_categories}")


def schedule_scale(config) -> float:
  """The factor on every epoch boundary of a resolved config (see "Short runs" above): ≤ 1."""
  full = int(config.num_epochs) * int(config.steps_per_epoch)
  return min(1.0, int(config.num_train_steps) / full) if full > 0 else 1.0


def warmup_steps(config) -> int:
  """Warm-up length of ``schedule.name='warmup_cosine'`` in steps, cut to half a too short run."""
  warm = int(round(float(config.schedule.warmup_epochs) * int(config.steps_per_epoch)))
  return min(warm, int(config.num_train_steps) // 2)


def ema_decay(config) -> float:
  """The EMA decay a run uses: ``optimizer.ema_decay``, cut so that the average spans ≤ a third of the run.

  An EMA with decay ``d`` averages over about ``1 / (1 − d)`` updates (0.999: ~1,000). A run shorter
  than three times that would evaluate an average reaching back to its first, untrained steps
  (measured on the notebook's 800-step CPU run: ``experiments/default_config.md``), so the decay is
  cut to ``1 − 3 / num_train_steps`` (floored at 0) there and :func:`schedule_fit_messages` says so.
  Runs of ≥ 3 / (1 − d) steps (3,000 for 0.999) are unchanged. 0 (no EMA) stays 0; an unresolved
  run length (``num_train_steps`` ≤ 0) leaves the decay as configured.

  Args:
    config: a resolved config (``optimizer.ema_decay``, ``num_train_steps``).

  Returns:
    The decay in [0, ``optimizer.ema_decay``].
  """
  decay = float(config.optimizer.ema_decay)
  total = int(config.get("num_train_steps", -1))
  if decay <= 0 or total <= 0:
    return decay
  return min(decay, max(0.0, 1.0 - 3.0 / total))


def schedule_fit_messages(config) -> list[str]:
  """What :func:`schedule_scale`, :func:`warmup_steps` and :func:`ema_decay` change in this resolved
  config (empty: nothing)."""
  out = []
  total = int(config.num_train_steps)
  s = schedule_scale(config)
  if s < 1.0:
    phases = []
    if config.schedule.name == "official":
      phases.append("LR burn-in/constant/cosine")
    if config.model.dropblock:
      phases.append("DropBlock steps")
    if config.dataset.mixup and int(config.dataset.no_mixup_epochs) > 0:
      phases.append("mixup switch-off")
    if config.dataset.random_resize and int(config.dataset.fixed_size_epochs) > 0:
      phases.append("fixed-size phase")
    if phases:
      out.append(f"num_train_steps={total} is shorter than num_epochs={config.num_epochs} x "
                 f"steps_per_epoch={config.steps_per_epoch}: the {', '.join(phases)} boundaries are "
                 f"laid out over this run (epoch boundaries x {s:.3g})")
  if config.schedule.name == "warmup_cosine":
    warm = int(round(float(config.schedule.warmup_epochs) * int(config.steps_per_epoch)))
    if warm > warmup_steps(config):
      out.append(f"warm-up of {warm} steps does not fit in num_train_steps={total}: cut to "
                 f"{warmup_steps(config)} steps (half the run)")
  decay, d = float(config.optimizer.ema_decay), ema_decay(config)
  if d < decay:
    out.append(f"EMA decay {decay:g} (an average over ~{1 / (1 - decay):.0f} steps) is too long for "
               f"num_train_steps={total}: cut to {d:.6g} (~{1 / (1 - d) if d < 1 else 0:.0f} steps, a third of the run)")
  return out
