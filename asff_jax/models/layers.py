"""Building blocks shared by backbone, neck, fusion and head (official spec §1).

All modules are ``flax.linen``, NHWC, and take ``train`` explicitly. Parameters
are float32; ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed
precision). Submodule names follow the official PyTorch names where one exists
(``conv``, ``batch_norm``) so that :mod:`asff_jax.models.official_weights` maps them by rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from asff_jax.models.conv_grad import conv_general_dilated as tap_grad_conv

Dtype = Any

# PyTorch's kaiming_normal_(a=0.1, mode='fan_in') for every nn.Conv2d (spec §7,
# `init_yolo`): std = sqrt(2 / (1 + a^2)) / sqrt(fan_in).
conv_init = nn.initializers.variance_scaling(2.0 / (1.0 + 0.1**2), "fan_in", "normal")
# PyTorch's default for layers `init_yolo` does not touch (DeformConv2d):
# kaiming_uniform_(a=sqrt(5)) -> U(±1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def scaled_channels(channels: int, width: float) -> int:
  """Channel count ``channels`` scaled by the width multiplier ``width``.

  ``width == 1`` returns ``channels`` unchanged (the official model). Otherwise
  the result is rounded to a multiple of 8 (at least 8), which keeps the
  4 deformable groups and the RFB's ``C/4`` branches integral.
  """
  if width == 1.0:
    return channels
  return max(8, int(round(channels * width / 8.0)) * 8)


_FROZEN_BN: contextvars.ContextVar = contextvars.ContextVar("asff_jax_frozen_bn", default=None)


@contextlib.contextmanager
def frozen_batch_norm(pattern: Optional[str]):
  """Within this context, every :class:`BatchNorm` whose ``scale`` path matches ``pattern`` runs in eval mode.

  ``pattern`` is a regex (``re.search``) over ``module/.../scale`` parameter
  paths (the ``init.freeze`` of :mod:`asff_jax.config`); None freezes nothing.
  Such a batch norm normalises with its running statistics and leaves them
  unchanged even with ``train=True`` (mmdetection's ``norm_eval`` for frozen
  stages). It acts while the model is *traced*, so wrap the ``model.apply``
  inside the jitted function.
  """
  token = _FROZEN_BN.set(re.compile(pattern) if pattern else None)
  try:
    yield
  finally:
    _FROZEN_BN.reset(token)


def _in_frozen_scope(path) -> bool:
  pattern = _FROZEN_BN.get()
  return pattern is not None and pattern.search("/".join(path) + "/scale") is not None


class BatchNorm(nn.Module):
  """Batch normalisation with PyTorch ``BatchNorm2d`` semantics (spec §1).

  * eps 1e-5, momentum 0.1 in PyTorch's convention:
    ``running = (1 - 0.1) * running + 0.1 * batch`` (Flax momentum 0.9).
  * Normalises with the biased batch variance; updates ``running_var`` with the
    unbiased one (``n / (n - 1)``), exactly as PyTorch does.
  * In training the statistics are over all of (B, H, W). Under ``jax.jit``
    with the batch sharded over a device mesh the mean is a global reduction,
    so this *is* SyncBN (spec §7, ``SYBN: True``) with no extra code.

  Statistics are computed in float32 whatever the compute dtype.

  Variables: ``params/{scale,bias}`` (C,), ``batch_stats/{mean,var}`` (C,).
  Input/output: ``(B, H, W, C)``.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train and not _in_frozen_scope(self.scope.path):
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(self.dtype)


ACTIVATIONS = ("leaky", "relu6", "linear")


def activation(x, act: str):
  """The official activations: ``'leaky'`` LeakyReLU(0.1) (Darknet models), ``'relu6'``
  min(max(x, 0), 6) (MobileNetV2 models), ``'linear'`` none (inverted-residual projections).

  Raises:
    ValueError: an unknown ``act``.
  """
  if act == "leaky":
    return nn.leaky_relu(x, 0.1)
  if act == "relu6":
    return jnp.clip(x, 0, 6)
  if act == "linear":
    return x
  raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def depthwise_conv(x, kernel, stride: int = 1):
  """Depthwise k×k conv with symmetric ``(k - 1) // 2`` zero padding, as a sum of k² shifted products.

  The same values as ``lax.conv_general_dilated(..., feature_group_count=C)``
  (tested, with gradients), computed as elementwise multiply-adds that XLA
  fuses into one loop: XLA:CPU's grouped convolution runs depthwise convs at
  under 1 GFLOP/s (measured 2026-12-06: 0.3-0.7 GFLOP/s at MobileNetV2's
  shapes, about 100x below a dense conv; ``experiments/benchmarks.md``).

  Args:
    x: ``(B, H, W, C)``.
    kernel: ``(k, k, 1, C)`` (Flax's grouped-conv layout; official ``(C, 1, k, k)``).
    stride: spatial stride.

  Returns:
    ``(B, ceil(H / stride), ceil(W / stride), C)`` for odd k.
  """
  k = kernel.shape[0]
  p = (k - 1) // 2
  _, h, w, _ = x.shape
  ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = None
  for dy in range(k):
    for dx in range(k):
      tap = jax.lax.slice(xp, (0, dy, dx, 0), (xp.shape[0], dy + stride * (ho - 1) + 1,
                                                dx + stride * (wo - 1) + 1, xp.shape[3]),
                          (1, stride, stride, 1))
      term = tap * kernel[dy, dx, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """A depthwise conv (no bias) with ``nn.Conv``'s parameter (``kernel`` ``(k, k, 1, C)``, same init),
  computed by :func:`depthwise_conv`. ``(B, H, W, C)`` → ``(B, H/stride, W/stride, C)``."""

  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, 1, c), jnp.float32)
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


class ConvBN(nn.Module):
  """Conv (no bias) → BatchNorm → activation: the official ``add_conv`` (spec §1).

  ``act`` is LeakyReLU(0.1) for the Darknet models, ReLU6 for the MobileNetV2
  ones, none for MobileNetV2's linear projections (:func:`activation`);
  ``groups`` > 1 is a grouped conv (``groups == features == C_in``: depthwise,
  computed by :class:`DepthwiseConv`).
  Padding is ``(k - 1) // 2`` on every side — symmetric, unlike Flax ``'SAME'``
  which pads stride-2 convs on even inputs as (0, 1).

  Input ``(B, H, W, C_in)`` → ``(B, ceil(H / stride), ceil(W / stride), features)``.
  """

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  act: str = "leaky"
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    p = (self.kernel_size - 1) // 2
    if self.groups > 1 and self.groups == self.features == x.shape[-1]:  # depthwise
      x = DepthwiseConv(self.kernel_size, self.stride, self.dtype, name="conv")(x)
    else:
      x = nn.Conv(
          self.features,
          (self.kernel_size, self.kernel_size),
          (self.stride, self.stride),
          padding=((p, p), (p, p)),
          feature_group_count=self.groups,
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=conv_init,
          conv_general_dilated=tap_grad_conv,
          name="conv",
      )(x)
    x = BatchNorm(dtype=self.dtype, name="batch_norm")(x, train)
    return activation(x, self.act)


class ResBlock(nn.Module):
  """``num_blocks`` × (1×1 conv ch→ch/2, 3×3 conv ch/2→ch), optional shortcut (spec §1).

  Without shortcut and with ``act='relu6'`` it is the MobileNet neck's ``ressepblock``.

  Submodules ``block_{b}/conv_{0,1}`` ↔ official ``module_list.{b}.{0,1}``.
  Input and output ``(B, H, W, channels)``.
  """

  channels: int
  num_blocks: int
  shortcut: bool = True
  dtype: Dtype = jnp.float32
  act: str = "leaky"

  @nn.compact
  def __call__(self, x, train: bool):
    for b in range(self.num_blocks):
      h = ConvBN(self.channels // 2, 1, dtype=self.dtype, act=self.act, name=f"block_{b}_conv_0")(x, train)
      h = ConvBN(self.channels, 3, dtype=self.dtype, act=self.act, name=f"block_{b}_conv_1")(h, train)
      x = x + h if self.shortcut else h
    return x


def max_pool_same(x, window: int, stride: int = 1):
  """Max-pool with symmetric ``window // 2`` padding treated as −inf (PyTorch ``MaxPool2d``)."""
  p = window // 2
  return nn.max_pool(x, (window, window), (stride, stride), padding=((p, p), (p, p)))


def spp(x):
  """Spatial pyramid pooling (spec §1): concat [x, maxpool5, maxpool9, maxpool13], stride 1.

  ``(B, H, W, C)`` → ``(B, H, W, 4C)``. The three pools are computed as a
  cascade of 5×5 pools (max over 9×9 = two 5×5, 13×13 = three), which is exact
  for max pooling with −inf padding and cheaper.
  """
  p5 = max_pool_same(x, 5)
  p9 = max_pool_same(p5, 5)
  p13 = max_pool_same(p9, 5)
  return jnp.concatenate([x, p5, p9, p13], axis=-1)


def upsample_nearest(x, factor: int):
  """Nearest-neighbour upsampling by an integer ``factor`` (= pixel repetition).

  Equals PyTorch ``F.interpolate(scale_factor=factor, mode='nearest')`` for
  integer factors. ``(B, H, W, C)`` → ``(B, factor·H, factor·W, C)``.
  """
  if factor == 1:
    return x
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


def drop_block(x, rng, block_size: int, keep_prob):
  """DropBlock (Ghiasi et al. 2018) as the official ``DropBlock`` in training (spec §1).

  gamma = (1 − keep)·W² / (bs²·(W − bs + 1)²) with W the feature width; a
  Bernoulli(gamma) seed per element, dilated by a ``bs``×``bs`` max-pool
  (stride 1, pad bs//2), inverted to a keep-mask, and the output rescaled by
  numel / sum(mask).

  Departure (documented): the official code caches gamma at the first call
  after each schedule change, so it goes stale when random resizing changes W;
  here gamma is recomputed from the current W on every call.

  Args:
    x: ``(B, H, W, C)``.
    rng: a PRNG key.
    block_size: odd int (static; the official schedule uses 1, 3, 5, 7).
    keep_prob: float in (0, 1]; may be traced.

  Raises:
    ValueError: if ``block_size`` is even or larger than the feature map.
  """
  if block_size % 2 != 1:
    raise ValueError(f"DropBlock block_size must be odd, got {block_size}")
  width = x.shape[2]
  if block_size > width:
    raise ValueError(f"DropBlock block_size {block_size} exceeds feature width {width}")
  gamma = (1.0 - keep_prob) * width**2 / (block_size**2 * (width - block_size + 1) ** 2)
  seeds = jax.random.bernoulli(rng, gamma, x.shape).astype(x.dtype)
  if block_size > 1:
    seeds = max_pool_same(seeds, block_size)
  mask = 1.0 - seeds
  total = jnp.sum(mask.astype(jnp.float32))
  factor = (mask.size / jnp.maximum(total, 1.0)).astype(x.dtype)
  return x * mask * factor


class DropBlock(nn.Module):
  """DropBlock layer; identity unless ``train`` and a ``(block_size, keep_prob)`` is given.

  The setting is passed per call (the official schedule changes it by epoch,
  spec §7): ``setting=None`` or ``keep_prob == 1`` is the identity. Uses the
  ``'dropblock'`` RNG stream.
  """

  @nn.compact
  def __call__(self, x, train: bool, setting=None):
    if not train or setting is None:
      return x
    block_size, keep_prob = setting
    if isinstance(keep_prob, (int, float)) and keep_prob >= 1.0:
      return x
    return drop_block(x, self.make_rng("dropblock"), int(block_size), keep_prob)


class RFBBlock(nn.Module):
  """Receptive-field block used by ASFF* in each head before the DCN (spec §1, §4).

  Plain convs with bias, no BN, no activation, no residual; ``inter = C / 4``:
  b0: 1×1; b1: 1×1 → 3×3; b2: 1×1 → 3×3 → 3×3 dil 2; b3: 1×1 → 5×5 → 3×3 dil 3.
  Output concat(b0..b3) has C channels. ``(B, H, W, C)`` → ``(B, H, W, C)``.
  Submodules ``branch_{b}_{k}`` ↔ official ``rfb.branch_{b}.{k}``.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    inter = c // 4
    specs: Sequence[Sequence[tuple[int, int]]] = (
        ((1, 1),),
        ((1, 1), (3, 1)),
        ((1, 1), (3, 1), (3, 2)),
        ((1, 1), (5, 1), (3, 3)),
    )  # (kernel, dilation) per conv
    outs = []
    for b, branch in enumerate(specs):
      h = x
      for k, (ksize, dil) in enumerate(branch):
        p = dil * (ksize - 1) // 2
        h = nn.Conv(
            inter, (ksize, ksize), padding=((p, p), (p, p)), kernel_dilation=(dil, dil),
            use_bias=True, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=conv_init, name=f"branch_{b}_{k}")(h)
      outs.append(h)
    return jnp.concatenate(outs, axis=-1)
