"""Detector models (backbone → neck → fusion → head), their targets and loss.

Entry point: :func:`create_model` builds the Flax detector from ``config.model``
(:mod:`asff_jax.config`). Modules, in the paper's order: ``layers`` (shared
blocks), ``darknet`` / ``mobilenet``, ``neck``, ``fusion``, ``head`` (+ ``dcn``), ``detector``;
then ``targets`` and ``losses`` (the official training loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from asff_jax.config import default_model_config
from asff_jax.errors import ConfigError
from asff_jax.models.config import (ANCHOR_MASKS, OFFICIAL_ANCHORS, STRIDES, YOLOV3_ANCHORS,
                                    resolve_anchors)
from asff_jax.models.dcn import FORMULATIONS
from asff_jax.models.detector import BACKBONES, YOLOv3
from asff_jax.models.fusion import FUSIONS

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(config) -> ml_collections.ConfigDict:
  """The model section of ``config`` (a full config with ``.model`` or the section itself)."""
  return config.model if "model" in config else config


def create_model(config) -> YOLOv3:
  """Builds the Flax detector from ``config.model`` (or a model config section).

  ``create_model(cfg).apply(variables, images, train=False)`` with images
  ``(B, H, W, 3)`` float32 ImageNet-normalised returns the dict documented on
  :class:`~asff_jax.models.detector.YOLOv3` (``'pred'``, ``'levels'``, ...).

  Raises:
    ConfigError: for an unknown backbone, fusion, dtype, deformable-conv formulation or anchor
      set, or RFB on MobileNetV2.
  """
  m = model_config(config)
  if m.fusion not in FUSIONS:
    raise ConfigError(f"model.fusion must be one of {FUSIONS}, got {m.fusion!r}")
  if m.dcn_formulation not in FORMULATIONS:
    raise ConfigError(f"model.dcn_formulation must be one of {FORMULATIONS}, got {m.dcn_formulation!r}")
  if m.dtype not in _DTYPES:
    raise ConfigError(f"model.dtype must be one of {tuple(_DTYPES)}, got {m.dtype!r}")
  if m.backbone not in BACKBONES:
    raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {m.backbone!r}")
  if m.backbone == "mobilenet_v2" and m.rfb:
    raise ConfigError("model.rfb=True needs model.backbone='darknet53': the official MobileNetV2 heads "
                      "have no feature adaption to put the RFB block in")
  compress_c = m.compress_c if m.compress_c is not None else (8 if m.rfb else 16)
  return YOLOv3(
      num_classes=int(m.num_classes),
      fusion=m.fusion,
      rfb=bool(m.rfb),
      compress_c=int(compress_c),
      anchors=resolve_anchors(m.anchors),
      width=float(m.width),
      stage_blocks=tuple(int(b) for b in m.stage_blocks),
      dtype=_DTYPES[m.dtype],
      dcn_formulation=str(m.dcn_formulation),
      backbone_type=str(m.backbone),
  )


def random_variables(model, input_hw=(64, 64), seed: int = 0) -> dict:
  """Random variables of ``model``'s structure without compiling ``model.init`` (numpy, seconds).

  Structure from ``jax.eval_shape``; kernels are normals with variance
  1/fan_in, BN scales and variances 1, biases and means 0 — well-conditioned
  stand-ins for trained weights in tests and benchmarks (full-width models in
  about a second, where ``init`` takes tens of seconds to compile on CPU).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_hw, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def make(path, sds):
    name = path[-1].key
    if name in ("var", "scale"):
      return np.ones(sds.shape, np.float32)
    if name in ("mean", "bias"):
      return np.zeros(sds.shape, np.float32)
    fan_in = int(np.prod(sds.shape[:-1]))
    return (rng.standard_normal(sds.shape) * np.sqrt(1.0 / max(fan_in, 1))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


__all__ = ["create_model", "default_model_config", "model_config", "random_variables", "YOLOv3", "BACKBONES",
           "FUSIONS", "ANCHOR_MASKS", "STRIDES", "OFFICIAL_ANCHORS", "YOLOV3_ANCHORS",
           "resolve_anchors"]
