"""Official PyTorch names of the detector's modules (spec §2–§4): Flax path → state-dict prefix.

Used by the converter (:mod:`asff_jax.models.official_weights`) and by the official
``--nowd`` weight-decay rule (:mod:`asff_jax.training.optim`).

==========================================  ===========================================
Flax path                                   official state_dict prefix
==========================================  ===========================================
``backbone/layer_i``                        ``module_list.i``
``neck/layer_i``                            ``module_list.i`` (ASFF numbering; the
                                            baseline's is shifted, spec §2)
``…/block_b_conv_k``                        ``…module_list.b.k`` (residual blocks)
``fusion_l/[resize/]X``                     ``level_l_fusion.X`` (ASFF)
``fusion_0/conv``, ``fusion_1/conv``        ``module_list.18``, ``module_list.27`` (baseline)
``head_l/…``                                ``level_l_header.…`` (ASFF);
                                            ``module_list.{19,28,37}.…`` (baseline)
``feature_adaption``, ``rfb/branch_b_k``    ``Feature_adaption``, ``rfb.branch_b.k``
==========================================  ===========================================

MobileNetV2 models (``backbone='mobilenet_v2'``, the official ``yolov3_mobilev2.py``):

==========================================  ===========================================
``backbone/layer_{0,18}/{conv,batch_norm}`` ``module_list.{0,18}.{0,1}``
``backbone/layer_i/expand``                 ``module_list.i.conv.0.{0,1}``
``backbone/layer_i/dw``                     ``module_list.i.conv.1.{0,1}`` (``conv.0.*`` for i = 1)
``backbone/layer_i/project/{conv,bn}``      ``module_list.i.conv.{2,3}`` (``conv.{1,2}`` for i = 1)
``neck/layer_i``                            ``module_list.{i + 8}``
``fusion_l/[resize/]X``, ``fusion_l/conv``  ``level_l_conv.X`` (ASFFmobile), ``level_l_conv`` (baseline)
``head_l/…``                                ``level_l_header.…``
==========================================  ===========================================
"""

from __future__ import annotations

import re

_BASELINE_HEAD = {0: 19, 1: 28, 2: 37}
_BASELINE_FUSION_CONV = {0: 18, 1: 27}


def _neck_index(i: int, fusion: str) -> int:
  if fusion != "none" or i <= 17:
    return i
  return i + 2 if i <= 24 else i + 4


_MOBILE_BLOCK = {"expand": ("0.0", "0.1"), "dw": ("1.0", "1.1"), "project": ("2", "3")}
_MOBILE_BLOCK_T1 = {"dw": ("0.0", "0.1"), "project": ("1", "2")}


def _mobile_backbone_name(i: int, rest: list[str]) -> str:
  """``module_list.i…`` of a MobileNetV2 ``backbone/layer_i/…`` path (module docstring table)."""
  if i in (0, 18):
    if rest not in (["conv"], ["batch_norm"]):
      raise KeyError(f"backbone/layer_{i}/{'/'.join(rest)}")
    return f"module_list.{i}.{0 if rest == ['conv'] else 1}"
  table = _MOBILE_BLOCK_T1 if i == 1 else _MOBILE_BLOCK
  if len(rest) != 2 or rest[0] not in table or rest[1] not in ("conv", "batch_norm"):
    raise KeyError(f"backbone/layer_{i}/{'/'.join(rest)}")
  return f"module_list.{i}.conv.{table[rest[0]][rest[1] == 'batch_norm']}"


def official_module_name(path: tuple[str, ...], fusion: str, backbone: str = "darknet53") -> str:
  """Official module prefix for a Flax module path (without collection and leaf).

  ``backbone``: ``'darknet53'`` or ``'mobilenet_v2'`` (``config.model.backbone``).

  Raises:
    KeyError: if the path has no official counterpart.
  """
  top, rest = path[0], list(path[1:])
  mobile = backbone == "mobilenet_v2"
  if mobile:
    m = re.fullmatch(r"layer_(\d+)", rest[0]) if rest else None
    if top == "backbone" and m:
      return _mobile_backbone_name(int(m.group(1)), rest[1:])
    if top == "neck" and m:
      path = (top, f"layer_{int(m.group(1)) + 8}", *rest[1:])
      return official_module_name(path, "asff")
    if (mf := re.fullmatch(r"fusion_(\d)", top)):
      tail = rest[1:] if rest[:1] in (["resize"], ["conv"]) else rest
      return ".".join([f"level_{mf.group(1)}_conv", *tail])
    if (mh := re.fullmatch(r"head_(\d)", top)):
      return ".".join([f"level_{mh.group(1)}_header", *rest])
    raise KeyError("/".join(path))
  out: list[str] = []
  m = re.fullmatch(r"layer_(\d+)", rest[0]) if rest else None
  if top in ("backbone", "neck"):
    if not m:
      raise KeyError("/".join(path))
    i = int(m.group(1))
    out.append(f"module_list.{_neck_index(i, fusion) if top == 'neck' else i}")
    rest = rest[1:]
  elif (mf := re.fullmatch(r"fusion_(\d)", top)):
    l = int(mf.group(1))
    if fusion == "none":
      if rest[:1] != ["conv"] or l not in _BASELINE_FUSION_CONV:
        raise KeyError("/".join(path))
      out.append(f"module_list.{_BASELINE_FUSION_CONV[l]}")
      rest = rest[1:]
    else:
      out.append(f"level_{l}_fusion")
      if rest[:1] == ["resize"]:
        rest = rest[1:]
  elif (mh := re.fullmatch(r"head_(\d)", top)):
    l = int(mh.group(1))
    out.append(f"module_list.{_BASELINE_HEAD[l]}" if fusion == "none" else f"level_{l}_header")
  else:
    raise KeyError("/".join(path))
  for seg in rest:
    if (mb := re.fullmatch(r"block_(\d+)_conv_(\d)", seg)):
      out.append(f"module_list.{mb.group(1)}.{mb.group(2)}")
    elif (mr := re.fullmatch(r"branch_(\d)_(\d)", seg)):
      out.append(f"branch_{mr.group(1)}.{mr.group(2)}")
    elif seg == "feature_adaption":
      out.append("Feature_adaption")
    else:
      out.append(seg)
  return ".".join(out)
