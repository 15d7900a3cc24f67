"""Official PyTorch state dicts ↔ Flax variables: the name and layout mapping (spec §1).

Library use::

    from asff_jax.models.official_weights import variables_from_official
    variables = variables_from_official(state_dict, config)          # strict
    variables, report = variables_from_official(sd, config, strict=False,
                                                return_report=True)   # partial

(also re-exported by :mod:`asff_jax.tools.convert`, whose ``python -m
asff_jax.convert`` writes the result as a checkpoint). Used by the training
warm start (:mod:`asff_jax.training.warm_start`), ``evaluate --pth`` and
``predict --pth``.

Name mapping: by rule, from the Flax variable path (the module prefixes in
:mod:`asff_jax.models.official_names`), plus the leaves:

==========================================  ===========================================
Flax                                        official
==========================================  ===========================================
``conv/kernel`` (kh, kw, I, O)              ``conv.weight`` (O, I, kh, kw)
``batch_norm/{scale,bias}``                 ``batch_norm.{weight,bias}``
``batch_stats …/{mean,var}``                ``batch_norm.running_{mean,var}``
==========================================  ===========================================

``num_batches_tracked`` entries are accepted and ignored. The ``'sum'`` and
``'concat'`` variants have no official checkpoint; their backbone, neck and
resize convs map like ASFF's, so ``strict=False`` loads those parts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from asff_jax.errors import ConfigError, DataError, MissingFileError
from asff_jax.models import create_model, model_config
from asff_jax.models.official_names import official_module_name


@dataclasses.dataclass
class _Leaf:
  collection: str
  path: tuple[str, ...]  # module path
  leaf: str
  shape: tuple[int, ...]
  official: str
  official_shape: tuple[int, ...]
  transpose: bool


def _leaf_spec(collection, path, leaf, shape, fusion, backbone) -> _Leaf:
  prefix = official_module_name(path, fusion, backbone)
  is_bn = path[-1] == "batch_norm"
  if collection == "batch_stats":
    name = {"mean": "running_mean", "var": "running_var"}[leaf]
  elif is_bn:
    name = {"scale": "weight", "bias": "bias"}[leaf]
  else:
    name = {"kernel": "weight", "bias": "bias"}[leaf]
  transpose = leaf == "kernel" and len(shape) == 4
  oshape = (shape[3], shape[2], shape[0], shape[1]) if transpose else tuple(shape)
  return _Leaf(collection, path, leaf, tuple(shape), f"{prefix}.{name}", oshape, transpose)


def expected_layout(config, input_hw=(64, 64)) -> list[_Leaf]:
  """Every Flax variable of ``create_model(config)`` with its official name and shape.

  Uses ``jax.eval_shape`` (no parameters are computed).

  Raises:
    KeyError: if a variable has no official counterpart (should not happen for
      the official variants).
  """
  model = create_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_hw, 3), jnp.float32))
  fusion, backbone = model_config(config).fusion, model_config(config).backbone
  leaves = []
  for coll in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(shapes.get(coll, {}))[0]
    for keypath, sds in flat:
      keys = tuple(k.key for k in keypath)
      leaves.append(_leaf_spec(coll, keys[:-1], keys[-1], sds.shape, fusion, backbone))
  return leaves


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch tensor, without importing torch
    v = v.detach().cpu().numpy()
  return np.asarray(v)


@dataclasses.dataclass
class LoadReport:
  """What :func:`variables_from_official` loaded.

  Attributes:
    loaded: official names copied into the variables.
    missing: official names the model expects but the state dict lacks (kept
      from ``base_variables``).
    unexpected: state-dict names that match no model variable.
    mismatched: ``(name, expected_shape, got_shape)`` triples.
    ignored: names skipped on purpose (``num_batches_tracked``).
  """

  loaded: list
  missing: list
  unexpected: list
  mismatched: list
  ignored: list

  def __str__(self) -> str:
    lines = [f"loaded {len(self.loaded)} tensors, missing {len(self.missing)}, "
             f"unexpected {len(self.unexpected)}, shape-mismatched {len(self.mismatched)}, "
             f"ignored {len(self.ignored)}"]
    for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                         ("mismatched", [f"{n}: expected {e}, got {g}" for n, e, g in self.mismatched])):
      for it in items[:20]:
        lines.append(f"  {title}: {it}")
      if len(items) > 20:
        lines.append(f"  ... and {len(items) - 20} more {title}")
    return "\n".join(lines)


def strip_state_dict(obj: Mapping[str, Any]) -> dict:
  """Unwraps a loaded official checkpoint: a ``'model'``/``'state_dict'`` entry and ``module.`` prefixes.

  Raises:
    ValueError: if no mapping of tensors can be found.
  """
  for key in ("model", "state_dict"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise DataError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
  out = {}
  for k, v in obj.items():
    k = k[len("module."):] if k.startswith("module.") else k
    out[k] = v
  return out


def variables_from_official(state_dict: Mapping[str, Any], config, *, strict: bool = True,
                            base_variables=None, return_report: bool = False):
  """Maps an official state dict to Flax ``{'params': ..., 'batch_stats': ...}``.

  Args:
    state_dict: official name → array (numpy array or torch tensor). A
      ``'model'``/``'state_dict'`` wrapper and ``module.`` prefixes are removed.
    config: full config or its ``model`` section (must describe the same
      variant: ``fusion``, ``rfb``, ``num_classes``, ``width``...).
    strict: if True, any missing, unexpected or mis-shaped key is an error. If
      False, what matches is loaded and the rest comes from ``base_variables``
      (or a fresh ``init`` with seed 0 if None); mis-shaped keys are still
      reported and skipped.
    base_variables: variables supplying what the state dict lacks (``strict=False``).
    return_report: also return a :class:`LoadReport`.

  Returns:
    ``variables`` (float32 numpy leaves), or ``(variables, report)``.

  Raises:
    ValueError: in strict mode, listing every missing / unexpected key and every
      shape mismatch with both shapes (e.g. loading ``--asff --rfb`` weights
      into an ASFF config fails on ``weight_level_*`` with 16 vs 8 channels).
  """
  sd = strip_state_dict(state_dict)
  layout = expected_layout(config)
  by_name = {leaf.official: leaf for leaf in layout}
  ignored = sorted(k for k in sd if k.endswith("num_batches_tracked"))
  unexpected = sorted(k for k in sd if k not in by_name and not k.endswith("num_batches_tracked"))
  missing, mismatched, loaded = [], [], []
  values = {}
  for leaf in layout:
    if leaf.official not in sd:
      missing.append(leaf.official)
      continue
    arr = _to_numpy(sd[leaf.official])
    if tuple(arr.shape) != leaf.official_shape:
      mismatched.append((leaf.official, leaf.official_shape, tuple(arr.shape)))
      continue
    arr = arr.astype(np.float32)
    if leaf.transpose:
      arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
    values[(leaf.collection, *leaf.path, leaf.leaf)] = arr
    loaded.append(leaf.official)
  report = LoadReport(loaded, missing, unexpected, mismatched, ignored)
  if strict and (missing or unexpected or mismatched):
    raise ConfigError("official state dict does not match the model config "
                     f"(backbone={model_config(config).backbone!r}, fusion={model_config(config).fusion!r}, "
                     f"rfb={model_config(config).rfb}):\n{report}")
  if missing:
    if base_variables is None:
      model = create_model(config)
      base_variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    base = jax.tree_util.tree_flatten_with_path(base_variables)[0]
    for keypath, v in base:
      key = tuple(k.key for k in keypath)
      values.setdefault(key, np.asarray(v, np.float32))
  variables = traverse_util.unflatten_dict(values)
  return (variables, report) if return_report else variables


def variables_to_official(variables, config) -> dict[str, np.ndarray]:
  """Inverse of :func:`variables_from_official`: Flax variables → official-format state dict.

  Useful to hand weights trained here to the official PyTorch code, and for
  round-trip tests. ``num_batches_tracked`` is not produced. The arrays are
  writable float32 copies (not read-only views of device buffers), so
  ``torch.from_numpy`` takes them as they are.

  Raises:
    KeyError: if ``variables`` lacks a variable the config's model has.
  """
  out = {}
  for leaf in expected_layout(config):
    node = variables[leaf.collection]
    for k in (*leaf.path, leaf.leaf):
      node = node[k]
    arr = np.array(node, np.float32)  # a copy: np.asarray of a jax.Array is read-only
    out[leaf.official] = np.ascontiguousarray(arr.transpose(3, 2, 0, 1)) if leaf.transpose else arr
  return out


def load_official_checkpoint(path: str) -> dict:
  """Reads an official ``.pth`` safely (``torch.load(weights_only=True)``) and strips wrappers.

  Raises:
    ImportError: if torch is not installed (``pip install asff_jax[convert]``).
    MissingFileError / DataError: for a missing or unreadable file.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel  (optional extra)
  except ImportError as e:
    raise ImportError("reading .pth files needs torch: pip install 'asff_jax[convert]'") from e
  if not os.path.exists(path):
    raise MissingFileError(f"{path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 — name the file in the error
    raise DataError(f"{path}: cannot read as a PyTorch checkpoint ({e})") from e
  return strip_state_dict(obj)


def official_to_flax(state_dict: Mapping[str, Any], config) -> dict:
  """The state dict's tensors that name a variable of ``create_model(config)``, in Flax layout, any shape.

  Unlike :func:`variables_from_official` nothing is checked: a tensor whose
  name matches is returned whatever its shape (the warm start decides what to
  do with a shape mismatch, e.g. another class count); names that match no
  variable and ``num_batches_tracked`` are dropped.

  Returns:
    ``{'params': …, 'batch_stats': …}`` nested dicts of float32 numpy arrays
    (kernels transposed to ``(kh, kw, I, O)``).
  """
  sd = strip_state_dict(state_dict)
  out = {}
  for leaf in expected_layout(config):
    if leaf.official not in sd:
      continue
    arr = np.asarray(_to_numpy(sd[leaf.official]), np.float32)
    if leaf.transpose and arr.ndim == 4:
      arr = np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
    out[(leaf.collection, *leaf.path, leaf.leaf)] = arr
  return traverse_util.unflatten_dict(out)


__all__ = ["LoadReport", "expected_layout", "strip_state_dict", "variables_from_official",
           "variables_to_official", "load_official_checkpoint", "official_to_flax"]
