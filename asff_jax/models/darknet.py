"""Darknet-53 backbone returning C3, C4, C5 (official spec §2, layers 0–10).

Submodule ``layer_{i}`` is the official ``module_list.{i}``:

====  =============================  ======  ======
 i    op                             out ch  stride
====  =============================  ======  ======
 0    conv 3×3 s1                    32      1
 1    conv 3×3 s2                    64      2
 2    resblock ×1                    64      2
 3    conv 3×3 s2                    128     4
 4    resblock ×2                    128     4
 5    conv 3×3 s2                    256     8
 6    resblock ×8 → C3               256     8
 7    conv 3×3 s2                    512     16
 8    resblock ×8 → C4               512     16
 9    conv 3×3 s2                    1024    32
 10   resblock ×4 → C5               1024    32
====  =============================  ======  ======
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from asff_jax.models.layers import ConvBN, ResBlock, scaled_channels

OFFICIAL_STAGE_BLOCKS = (1, 2, 8, 8, 4)


class Darknet53(nn.Module):
  """Darknet-53 (Redmon & Farhadi 2018), conv-BN-leaky throughout.

  Attributes:
    width: channel multiplier (1.0 = official; smaller for CPU tests).
    stage_blocks: residual blocks per stage (official ``(1, 2, 8, 8, 4)``).
    dtype: compute dtype.

  Input ``(B, H, W, 3)`` with H, W multiples of 32. Returns
  ``(C3, C4, C5)`` = ``(B, H/8, W/8, 256w)``, ``(B, H/16, W/16, 512w)``,
  ``(B, H/32, W/32, 1024w)``.
  """

  width: float = 1.0
  stage_blocks: Sequence[int] = OFFICIAL_STAGE_BLOCKS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    ch = lambda c: scaled_channels(c, self.width)
    x = ConvBN(ch(32), 3, dtype=self.dtype, name="layer_0")(x, train)
    feats = []
    for s, nblocks in enumerate(self.stage_blocks):
      c = ch(64 * 2**s)
      x = ConvBN(c, 3, stride=2, dtype=self.dtype, name=f"layer_{2 * s + 1}")(x, train)
      x = ResBlock(c, nblocks, dtype=self.dtype, name=f"layer_{2 * s + 2}")(x, train)
      feats.append(x)
    return feats[2], feats[3], feats[4]
