"""Depthwise 3×3 convs on this CPU: XLA's grouped conv against the shifted sums the model uses.

    python experiments/depthwise_check.py

For MobileNetV2's depthwise shapes (batch 1 at 416 px) it times
``lax.conv_general_dilated(feature_group_count=C)``, the shifted-sum
:func:`asff_jax.models.layers.depthwise_conv` (and checks they agree), and a
dense 1×1 conv on the same grid for scale; then the MobileNetV2 backbone and
the MobileNetV2 + ASFF forward as shipped. Record: ``experiments/benchmarks.md``
("MobileNetV2 models").
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from asff_jax.models import create_model, default_model_config, random_variables
from asff_jax.models.layers import depthwise_conv
from asff_jax.models.mobilenet import MobileNetV2

SHAPES = ((208, 96, 2), (104, 144, 1), (52, 192, 1), (26, 384, 1), (26, 576, 1), (13, 960, 1))


def median_time(f, *args, n: int = 7) -> float:
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def flops(f, *args) -> float:
  return float(jax.jit(f).lower(*args).compile().cost_analysis()["flops"])


def main() -> int:
  rng = np.random.default_rng(0)
  conv = lambda x, k, s, g: jax.lax.conv_general_dilated(
      x, k, (s, s), ((1, 1), (1, 1)) if k.shape[0] == 3 else "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g)
  for hw, c, s in SHAPES:
    x = jnp.asarray(rng.standard_normal((1, hw, hw, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, c)), jnp.float32)
    grouped = jax.jit(lambda x, k, s=s, c=c: conv(x, k, s, c))
    shifted = jax.jit(lambda x, k, s=s: depthwise_conv(x, k, s))
    diff = float(jnp.abs(grouped(x, k) - shifted(x, k)).max())
    k1 = jnp.asarray(rng.standard_normal((1, 1, c, c)), jnp.float32)
    dense = jax.jit(lambda x, k: conv(x, k, 1, 1))
    xo = x[:, ::s, ::s]
    tg, ts, td = median_time(grouped, x, k), median_time(shifted, x, k), median_time(dense, xo, k1)
    print(f"depthwise 3x3 {hw}x{hw}x{c} stride {s}: grouped lax conv {tg * 1e3:.2f} ms "
          f"({flops(grouped, x, k) / tg / 1e9:.1f} GFLOP/s), shifted sums {ts * 1e3:.2f} ms "
          f"(max diff {diff:.1e}); dense 1x1 {c}->{c} {td * 1e3:.2f} ms", flush=True)
  x = jnp.asarray(rng.standard_normal((1, 416, 416, 3)), jnp.float32)
  backbone = MobileNetV2()
  v = backbone.init(jax.random.key(0), x[:, :64, :64], False)
  fb = jax.jit(lambda v, x: backbone.apply(v, x, False))
  tb = median_time(fb, v, x)
  print(f"MobileNetV2 backbone, 416 b1: {tb * 1e3:.1f} ms "
        f"({flops(lambda v, x: backbone.apply(v, x, False), v, x) / tb / 1e9:.1f} GFLOP/s)")
  cfg = default_model_config()
  cfg.backbone, cfg.anchors = "mobilenet_v2", "yolov3"
  model = create_model(cfg)
  mv = random_variables(model, (416, 416))
  fm = jax.jit(lambda v, x: model.apply(v, x, train=False)["pred"])
  print(f"MobileNetV2 + ASFF forward, 416 b1: {median_time(fm, mv, x) * 1e3:.1f} ms")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
