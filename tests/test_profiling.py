"""``asff_jax.tools.profiling``: HLO parsing (kinds, FLOPs, regions) and a traced profile of a small function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asff_jax.tools import profiling


def _conv_dot(x, w, m):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.einsum("bpc,cd->bpd", y.reshape(x.shape[0], -1, w.shape[-1]), m)


def test_parse_hlo_flops_and_kinds():
  x, w, m = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 12)), jnp.ones((12, 5))
  compiled = jax.jit(_conv_dot).lower(x, w, m).compile()
  ops = profiling.parse_hlo(compiled.as_text())
  conv = [o for o in ops.values() if o["kind"] == "conv"]
  dot = [o for o in ops.values() if o["kind"] == "dot"]
  assert len(conv) == 1 and len(dot) == 1
  assert conv[0]["flops"] == 2 * (2 * 16 * 16 * 12) * (3 * 3 * 8)
  assert dot[0]["flops"] == 2 * (2 * 16 * 16 * 5) * 12
  # XLA's own count differs only at the zero-padded border taps, which it leaves out
  # (16x16 output, 3x3 SAME: 46² of 48² taps in each direction pair are inside)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert float(cost["flops"]) == 2 * 2 * 12 * 8 * 46 ** 2 + dot[0]["flops"]


def test_region_of_module_paths():
  assert profiling.region_of("jit(f)/YOLOv3/backbone/layer_0/conv/conv_general_dilated") == "backbone"
  assert profiling.region_of("jit(f)/transpose(jvp(YOLOv3))/head_1/feature_adaption/dconv/dot_general") == "dcn"
  assert profiling.region_of("jit(f)/YOLOv3/head_2/conv/conv_general_dilated") == "head"
  assert profiling.region_of("jit(f)/YOLOv3/fusion_0/weight_level_0/conv") == "fusion"
  assert profiling.region_of("jit(f)/sgd/add") == "decode/loss/optimizer"


def test_profile_compiled_adds_up():
  x, w, m = jnp.ones((2, 32, 32, 16)), jnp.ones((3, 3, 16, 16)), jnp.ones((16, 8))
  f = jax.jit(jax.grad(lambda x, w, m: jnp.sum(jnp.tanh(_conv_dot(x, w, m))), argnums=(1, 2)))
  compiled = f.lower(x, w, m).compile()
  prof = profiling.profile_compiled(compiled, lambda: compiled(x, w, m), runs=2)
  assert prof["total_s"] > 0 and prof["wall_s"] > 0
  for table in ("by_region", "by_kind"):
    shares = [v["share"] for v in prof[table].values()]
    assert np.isclose(sum(shares), 1.0)
    assert np.isclose(sum(v["seconds"] for v in prof[table].values()), prof["total_s"])
  kinds = {k.split("/")[0] for k in prof["by_kind"]}
  assert "conv" in kinds and "dot" in kinds
  assert any(k.endswith("/backward") for k in prof["by_kind"])  # the gradient's transposes
  text = profiling.format_profile(prof, peak_gflops=100.0)
  assert "by region" in text and "by kind" in text
