"""Deterministic official-format state dicts for parity checks (``../shared/parity/README.md``).

The parity fixture stores the official model's tensors for weights that are
regenerated from ``state_dict_spec*.json`` by this rule, per entry in order:
``z = numpy.random.default_rng(seed).standard_normal(shape)`` in float64
(``abs(z)`` for rule ``abs_normal``), ``value = offset + scale·z`` cast to
float32; rule ``zeros`` gives zeros of the stated dtype. Converting such a
state dict with :func:`asff_jax.models.official_weights.variables_from_official` and running
our model must reproduce the stored official outputs.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from asff_jax import cli
from asff_jax.config import default_model_config
from asff_jax.models import create_model
from asff_jax.models.official_weights import variables_from_official


def state_dict_from_spec(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Regenerates the official-format state dict described by a ``state_dict_spec*.json``.

  Returns:
    Ordered dict official name → numpy array (float32, or int64 for
    ``num_batches_tracked``).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: for an entry with an unknown rule.
  """
  with open(path) as f:
    spec = json.load(f)
  out = {}
  for e in spec["entries"]:
    shape = tuple(e["shape"])
    if e["rule"] == "zeros":
      out[e["name"]] = np.zeros(shape, np.dtype(e["dtype"]))
      continue
    if e["rule"] not in ("normal", "abs_normal"):
      raise ValueError(f"{path}: entry {e['name']!r} has unknown rule {e['rule']!r}")
    z = np.random.default_rng(e["seed"]).standard_normal(shape)
    if e["rule"] == "abs_normal":
      z = np.abs(z)
    out[e["name"]] = np.asarray(e["offset"] + e["scale"] * z).astype(np.float32)
  return out


def compare_with_official(parity_dir: str | os.PathLike, rfb: bool = False) -> list[tuple[str, float, float]]:
  """Runs our model with the regenerated weights on the fixture input; compares every stage.

  Returns rows ``(name, max_abs_error, max_abs_reference)`` for backbone, neck,
  fusion outputs and weights, head outputs and ``pred``.

  Raises:
    FileNotFoundError: if the fixture files are missing.
  """
  parity_dir = os.fspath(parity_dir)
  cfg = default_model_config()
  cfg.rfb = rfb
  spec = "state_dict_spec_rfb.json" if rfb else "state_dict_spec.json"
  variables = variables_from_official(state_dict_from_spec(os.path.join(parity_dir, spec)), cfg)
  io_main = np.load(os.path.join(parity_dir, "asff_official_io.npz"))
  io = np.load(os.path.join(parity_dir, "asff_rfb_official_io.npz")) if rfb else io_main
  model = create_model(cfg)
  x = jnp.asarray(io_main["input"].transpose(0, 2, 3, 1))
  out = jax.tree.map(np.asarray, jax.jit(lambda v, x: model.apply(v, x))(variables, x))
  nhwc = lambda a: a.transpose(0, 2, 3, 1) if a.ndim == 4 else a
  rows = []

  def add(name, ours, ref):
    ref = nhwc(ref)
    rows.append((name, float(np.abs(ours - ref).max()), float(np.abs(ref).max())))

  if not rfb:
    for i, k in enumerate(("c3", "c4", "c5")):
      add(f"backbone_{k}", out["backbone"][i], io[f"backbone_{k}"])
  for l in range(3):
    add(f"neck_l{l}", out["neck"][l], io_main[f"neck_l{l}"])
  for l in range(3):
    lv = out["levels"][l]
    add(f"asff_out_l{l}", lv["head_input"], io[f"asff_out_l{l}"])
    add(f"asff_weights_l{l}", lv["fusion_weights"], io[f"asff_weights_l{l}"])
    add(f"asff_fused_sum_l{l}", lv["fused_sum"], io[f"asff_fused_sum_l{l}"])
    if rfb:
      add(f"head_rfb_l{l}", lv["rfb"], io[f"head_rfb_l{l}"])
    add(f"head_guide_wh_l{l}", lv["guide_wh"], io[f"head_guide_wh_l{l}"])
    add(f"head_offset_l{l}", lv["offset"], io[f"head_offset_l{l}"])
    if not rfb:
      add(f"head_adapted_l{l}", lv["adapted"], io[f"head_adapted_l{l}"])
    add(f"head_raw_l{l}", lv["raw"], io[f"head_raw_l{l}"])
  add("pred", out["pred"], io["pred"])
  return rows


def main(argv=None):
  """``python -m asff_jax.tools.parity [--shared ../shared]``: prints the parity table for ASFF and ASFF*."""
  def define(fv, _argv):
    flags.DEFINE_string("shared", os.path.join("..", "shared"), "the shared/ folder holding parity/", flag_values=fv)

  def run(f):
    worst = 0.0
    for rfb in (False, True):
      print(f"== {'ASFF* (rfb)' if rfb else 'ASFF'}: our model vs the official PyTorch model ==")
      print(f"{'tensor':24s} {'max |err|':>11s} {'max |ref|':>11s} {'err/ref':>9s}")
      for name, err, ref in compare_with_official(os.path.join(f.shared, "parity"), rfb):
        print(f"{name:24s} {err:11.3e} {ref:11.3e} {err / ref:9.1e}")
        worst = max(worst, err / ref)
    print(f"worst error relative to tensor scale: {worst:.1e} (tests require <= 1e-4)")
    return 0 if worst <= 1e-4 else 1

  return cli.run(run, "asff_jax.tools.parity", argv, define)


if __name__ == "__main__":
  sys.exit(main())
