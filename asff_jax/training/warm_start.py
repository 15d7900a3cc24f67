"""Start a run from weights (``config.init``): load, match, report, freeze.

One mechanism for every case (spec §7: the official recipe starts from the
ImageNet backbone file ``darknet53_feature_mx.pth``, loaded non-strictly into
the full detector; fine-tuning starts from COCO weights):

* ``init.checkpoint`` — an official ``.pth``/``.pt`` (converted on the fly by
  :func:`asff_jax.models.official_weights.official_to_flax`: the backbone file
  with keys ``module_list.0``–``10.*``, or a full official detector), a
  workdir (its latest checkpoint, the EMA parameters if the run kept them) or
  an orbax ``.../checkpoints/<step>/state`` folder;
* ``init.include`` / ``init.exclude`` — regexes (``re.search``) over the leaf
  path ``module/.../leaf`` (no collection prefix; a batch norm's
  ``batch_stats/.../mean`` has the same module path as its ``params/.../scale``);
* a leaf of the fresh model is **loaded** when it is included, not excluded,
  present in the source and of the same shape. A prediction conv
  (``head_l/conv``, ``4 · (5 + C)`` output channels, slot-major: channel
  ``a · (5 + C) + k`` is slot ``a``'s k-th output, spec §4) whose source has
  another class count is loaded **partly**: for each of the 4 slots the 5 box
  and objectness channels (x, y, w, h, obj) come from the source, the C class
  channels stay fresh;
* everything else stays **fresh** (the model's own init), with the reason:
  ``excluded``, ``missing`` (not in the source) or ``shape`` (shape mismatch).

:func:`warm_start` returns the merged variables and an :class:`InitReport`
that the training loop logs. It is applied at step 0 only; a run that resumes
from its own checkpoint ignores ``init.checkpoint`` (the resumed state already
holds the loaded weights).

Freezing (``init.freeze``, a regex over the same paths; independent of
``init.checkpoint``): :func:`frozen_mask` marks the parameters; the train step
(:mod:`asff_jax.training.step`) gives them a zero gradient and keeps their
value and EMA, the optimizer (:func:`asff_jax.training.optim.make_optimizer`)
takes them out of weight decay, and the batch norms whose ``scale`` matches
run in eval mode (:func:`asff_jax.models.layers.frozen_batch_norm`), so their
running statistics stay fixed too. Frozen leaves are bit-identical after any
number of steps (``tests/test_warm_start.py``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from asff_jax.errors import ConfigError, MissingFileError
from asff_jax.models.head import NUM_SLOTS
from asff_jax.models import official_weights
from asff_jax.training import checkpoints

Flat = dict[tuple[str, ...], np.ndarray]  # (collection, module..., leaf) -> array


def flatten(variables: Mapping[str, Any]) -> Flat:
  """``{'params': …, 'batch_stats': …}`` → ``{(collection, *module_path, leaf): array}``."""
  out = {}
  for keypath, v in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
    out[tuple(str(getattr(k, "key", k)) for k in keypath)] = v
  return out


def unflatten(flat: Flat) -> dict:
  """Inverse of :func:`flatten` (nested plain dicts)."""
  return traverse_util.unflatten_dict(dict(flat))


def leaf_path(key: tuple[str, ...]) -> str:
  """The path the ``init`` regexes see: ``module/.../leaf`` without the collection."""
  return "/".join(key[1:])


def _compile(pattern: Optional[str], name: str):
  if pattern is None or pattern == "":
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"init.{name}={pattern!r} is not a valid regular expression: {e}") from e


@dataclasses.dataclass
class InitReport:
  """What :func:`warm_start` did with each leaf (lists of ``module/.../leaf`` paths).

  Attributes:
    source: the checkpoint path.
    loaded: copied from the source.
    partial: prediction convs with the box/objectness channels copied and
      fresh class channels (``(path, source_classes, classes)``).
    excluded: not included, or excluded, by the regexes (fresh).
    missing: not in the source (fresh).
    shape: ``(path, model_shape, source_shape)`` mismatches (fresh).
    unused: source leaves that match no model leaf.
  """

  source: str
  loaded: list = dataclasses.field(default_factory=list)
  partial: list = dataclasses.field(default_factory=list)
  excluded: list = dataclasses.field(default_factory=list)
  missing: list = dataclasses.field(default_factory=list)
  shape: list = dataclasses.field(default_factory=list)
  unused: list = dataclasses.field(default_factory=list)

  @property
  def fresh(self) -> int:
    """Number of leaves left at the model's own init."""
    return len(self.excluded) + len(self.missing) + len(self.shape)

  def __str__(self) -> str:
    lines = [f"init from {self.source}: loaded {len(self.loaded)} tensors, partly "
             f"{len(self.partial)} (class channels fresh), fresh {self.fresh} (excluded "
             f"{len(self.excluded)}, missing in the source {len(self.missing)}, shape mismatch "
             f"{len(self.shape)}), unused source tensors {len(self.unused)}"]
    rows = ([f"  partly: {p} (source {a} classes, model {b}: box/objectness channels loaded)"
             for p, a, b in self.partial]
            + [f"  shape mismatch: {p}: model {m}, source {s}" for p, m, s in self.shape]
            + _grouped("missing in the source", self.missing)
            + _grouped("excluded", self.excluded) + _grouped("unused", self.unused))
    lines += rows[:40]
    if len(rows) > 40:
      lines.append(f"  ... and {len(rows) - 40} more lines")
    return "\n".join(lines)


def _grouped(title: str, paths: list) -> list[str]:
  """One line per top-level module: ``title: module (n tensors)``."""
  counts: dict[str, int] = {}
  for p in paths:
    top = p.split("/")[0]
    counts[top] = counts.get(top, 0) + 1
  return [f"  {title}: {top}/ ({n} tensors)" for top, n in counts.items()]


def _class_split(value: np.ndarray, source: np.ndarray, num_classes: int):
  """The prediction conv's fresh ``value`` with the source's box/objectness channels; None if not one.

  Both have the output channels on the last axis: ``4 · (5 + C)`` in the
  model, ``4 · (5 + C')`` in the source, other axes equal.
  """
  o, o_src = value.shape[-1], source.shape[-1]
  if (value.shape[:-1] != source.shape[:-1] or o != NUM_SLOTS * (5 + num_classes)
      or o_src % NUM_SLOTS or o_src // NUM_SLOTS <= 5):
    return None
  lead = value.shape[:-1]
  out = np.array(value, np.float32).reshape(*lead, NUM_SLOTS, 5 + num_classes)
  src = np.asarray(source, np.float32).reshape(*lead, NUM_SLOTS, o_src // NUM_SLOTS)
  out[..., :5] = src[..., :5]
  return out.reshape(value.shape), o_src // NUM_SLOTS - 5


def merge(fresh: Mapping[str, Any], source: Flat, *, include: Optional[str] = None,
          exclude: Optional[str] = None, num_classes: Optional[int] = None,
          source_name: str = "") -> tuple[dict, InitReport]:
  """Lays ``source`` leaves over the ``fresh`` variables by name and shape (module docstring).

  Args:
    fresh: the model's freshly initialised ``{'params', 'batch_stats'}``.
    source: flat source leaves (:func:`flatten` keys, Flax layout).
    include, exclude: regexes over :func:`leaf_path`; None = all / none.
    num_classes: the model's C (enables the partial load of prediction convs).
    source_name: for the report.

  Returns:
    ``(variables, report)``; variables are float32 numpy trees.

  Raises:
    ConfigError: an invalid regex.
  """
  inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
  report = InitReport(source_name)
  out = {}
  for key, value in flatten(fresh).items():
    path = leaf_path(key)
    value = np.asarray(value)
    if (inc is not None and not inc.search(path)) or (exc is not None and exc.search(path)):
      report.excluded.append(path)
      out[key] = value
      continue
    if key not in source:
      report.missing.append(path)
      out[key] = value
      continue
    src = np.asarray(source[key])
    if src.shape == value.shape:
      out[key] = src.astype(value.dtype)
      report.loaded.append(path)
      continue
    split = _class_split(value, src, num_classes) if num_classes is not None else None
    if split is not None and key[-2] == "conv" and key[1].startswith("head_"):
      out[key] = split[0]
      report.partial.append((path, split[1], num_classes))
    else:
      report.shape.append((path, tuple(value.shape), tuple(src.shape)))
      out[key] = value
  report.unused = sorted(leaf_path(k) for k in source if k not in out)
  return unflatten(out), report


def _is_state_folder(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, "_METADATA"))


def load_source(path: str, config) -> Flat:
  """The leaves of ``init.checkpoint`` in Flax layout (see the module docstring for the kinds).

  Raises:
    MissingFileError: no such file or folder, or a workdir without a checkpoint.
    DataError: an unreadable ``.pth``.
    ImportError: a ``.pth`` without torch installed.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise MissingFileError(f"init.checkpoint={path}: no such file or folder")
  if os.path.isfile(path):
    state_dict = official_weights.load_official_checkpoint(path)
    return flatten(official_weights.official_to_flax(state_dict, config))
  if _is_state_folder(path):
    tree = checkpoints.restore_on_one_device(path)
    return flatten(checkpoints.variables_of(tree, use_ema=True))
  variables, _ = checkpoints.load_variables(path)
  return flatten(variables)


def warm_start(fresh: Mapping[str, Any], config) -> tuple[dict, InitReport]:
  """``fresh`` variables with ``config.init.checkpoint`` laid over them (module docstring).

  Raises:
    ConfigError, MissingFileError, DataError: see :func:`merge` and :func:`load_source`.
  """
  i = config.init
  source = load_source(i.checkpoint, config)
  return merge(fresh, source, include=i.include, exclude=i.exclude,
               num_classes=int(config.model.num_classes), source_name=os.fspath(i.checkpoint))


def frozen_mask(params, pattern: Optional[str]):
  """Boolean pytree like ``params``: True where :func:`leaf_path` matches ``init.freeze``.

  Raises:
    ConfigError: an invalid regex, or one that matches no parameter.
  """
  rx = _compile(pattern, "freeze")
  if rx is None:
    return jax.tree.map(lambda _: False, params)
  mask = jax.tree_util.tree_map_with_path(
      lambda kp, _: rx.search(leaf_path(("params", *(str(getattr(k, "key", k)) for k in kp))))
      is not None, params)
  if not any(jax.tree.leaves(mask)):
    raise ConfigError(f"init.freeze={pattern!r} matches no parameter (paths look like "
                      "'backbone/layer_0/conv/kernel')")
  return mask


__all__ = ["InitReport", "merge", "load_source", "warm_start", "frozen_mask", "flatten",
           "unflatten", "leaf_path"]
