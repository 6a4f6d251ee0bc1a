"""Swin Transformer (torchvision's ``swin_t`` family) as Flax NNX modules: the float model.

``model_config('tiny')`` is torchvision's ``swin_t``: patch 4, embed 96, depths 2-2-6-2,
heads 3-6-12-24, window 7, LayerNorm eps 1e-5. ``create_model(config, rngs)`` builds it;
``model(images_nhwc, train=...)`` returns the logits of its one head. Layouts are
Flax's (Dense kernels ``(in, out)``, NHWC maps); parameter names follow torchvision's
through ``ofq_jax.interop.load_torchvision_swin``.

What torchvision does and this module does too: shifted windows (roll by ``-M//2``)
with the -100 mask between regions of the rolled map, the shift switched off per axis
when the padded map is no larger than the window, relative-position bias
``table[(dr + M-1) * (2M-1) + (dc + M-1)]``, patch merging concatenating the sub-grids
``(0,0), (1,0), (0,1), (1,1)`` (row, column offsets) before its LayerNorm and bias-free
reduction, stochastic depth per sample growing linearly over the blocks, mean pooling
and one head. The quantized Swin (the OFQ paper's third model) is not built yet.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.errors import UserError
from ofq_jax.models.config import PRECISIONS, quant_defaults
from ofq_jax.models.fences import residual_fence
from ofq_jax.models.layers import dense, erf_gelu

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
}
MASKED = -100.0
"""What torchvision adds to the logits of token pairs from different regions of a rolled map."""


def model_config(size: str | None = None, **overrides: Any) -> ml_collections.ConfigDict:
  """Swin config: a preset (``tiny`` = ``swin_t``, or None) plus overrides."""
  config = ml_collections.ConfigDict()
  config.arch = "swin"
  config.size = size
  config.embed_dim = 96
  config.depths = (2, 2, 6, 2)
  config.num_heads = (3, 6, 12, 24)
  config.window_size = 7
  config.patch_size = 4
  config.img_size = 224
  config.in_chans = 3
  config.mlp_ratio = 4.0
  config.num_classes = 1000
  config.layer_norm_eps = 1e-5
  # Stochastic depth of the last block (torchvision's swin_t: 0.2; the OFQ recipe: 0).
  config.drop_path = 0.0
  config.precision = "highest"
  config.quant = quant_defaults()
  if size is not None:
    if size not in PRESETS:
      raise UserError(f"Unknown Swin size {size!r}; use one of {sorted(PRESETS)} or None.")
    config.update(PRESETS[size])
  quant_overrides = overrides.pop("quant", None)
  for key in overrides:
    if key not in config:
      raise KeyError(f"swin.model_config got unknown field {key!r}; known fields: "
                     f"{sorted(config.keys())}.")
  config.update(overrides)
  config.depths = tuple(config.depths)
  config.num_heads = tuple(config.num_heads)
  if quant_overrides:
    config.quant.update(dict(quant_overrides))
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``UserError`` naming the bad value and the fix."""
  if len(config.depths) != len(config.num_heads):
    raise UserError(f"depths={tuple(config.depths)} and num_heads={tuple(config.num_heads)} "
                    "need one entry per stage each.")
  for stage, heads in enumerate(config.num_heads):
    dim = config.embed_dim * 2 ** stage
    if dim % heads:
      raise UserError(f"stage {stage} has {dim} channels, not divisible by num_heads[{stage}]"
                      f"={heads}; choose heads dividing embed_dim * 2^stage.")
  if config.img_size % config.patch_size:
    raise UserError(f"img_size={config.img_size} is not divisible by patch_size="
                    f"{config.patch_size}; choose an image size that is a multiple of it.")
  if not 0.0 <= config.drop_path < 1.0:
    raise UserError(f"drop_path={config.drop_path!r} is not in [0, 1).")
  if config.precision not in PRECISIONS:
    raise UserError(f"precision={config.precision!r} is not one of {PRECISIONS}.")
  if config.quant.enabled:
    raise UserError("model.quant.enabled=True: the quantized Swin is not built yet (issue "
                    "15); train the float Swin, or use DeiT for OFQ.")


def relative_position_index(window: int) -> np.ndarray:
  """``(N, N)`` index into the ``((2M-1)^2, H)`` table, tokens row-major in the window."""
  rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  coords = np.stack([rows.ravel(), cols.ravel()])               # (2, N)
  delta = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, N, N)
  return delta[0] * (2 * window - 1) + delta[1]


def shift_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray:
  """``(nW, N, N)``: 0 within a region of the rolled map, ``MASKED`` across regions."""
  labels = np.zeros((height, width), np.float32)
  bands = lambda size, s: ((0, size - window), (size - window, size - s), (size - s, size))
  count = 0
  for r0, r1 in bands(height, shift[0]):
    for c0, c1 in bands(width, shift[1]):
      labels[r0:r1, c0:c1] = count
      count += 1
  windows = labels.reshape(height // window, window, width // window, window)
  windows = windows.transpose(0, 2, 1, 3).reshape(-1, window * window)
  return np.where(windows[:, None, :] != windows[:, :, None], MASKED, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """``(B, H, W, C)`` -> ``(B * nW, M*M, C)``: windows batch-major, then row-major."""
  batch, height, width, chans = x.shape
  x = jnp.reshape(x, (batch, height // window, window, width // window, window, chans))
  return jnp.reshape(jnp.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, window * window, chans))


def window_merge(x: jax.Array, batch: int, height: int, width: int, window: int) -> jax.Array:
  """Inverse of ``window_partition``."""
  chans = x.shape[-1]
  x = jnp.reshape(x, (batch, height // window, width // window, window, window, chans))
  return jnp.reshape(jnp.transpose(x, (0, 1, 3, 2, 4, 5)), (batch, height, width, chans))


class Linear(nnx.Module):
  """``x @ kernel (+ bias)`` as one GEMM at the config's precision (torch's init)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, bias: bool = True,
               precision: str = "highest"):
    bound = 1.0 / np.sqrt(in_features)
    init = nnx.initializers.uniform(2 * bound)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)) - bound)
    self.bias = nnx.Param(init(rngs.params(), (out_features,)) - bound) if bias else None
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(x, self.kernel[...], self.precision)
    return y if self.bias is None else y + self.bias[...]


class ShiftedWindowAttention(nnx.Module):
  """Window attention with relative-position bias, on a ``(B, H, W, C)`` map."""

  def __init__(self, dim: int, heads: int, window: int, shift: int, *, rngs: nnx.Rngs,
               precision: str):
    self.heads, self.window, self.shift = heads, window, shift
    self.qkv = Linear(dim, 3 * dim, rngs=rngs, precision=precision)
    self.proj = Linear(dim, dim, rngs=rngs, precision=precision)
    table = nnx.initializers.truncated_normal(stddev=0.02)
    self.relative_position_bias_table = nnx.Param(
        table(rngs.params(), ((2 * window - 1) ** 2, heads)))
    self.precision = precision

  def position_bias(self) -> jax.Array:
    """``(H, N, N)`` bias read from the table."""
    index = relative_position_index(self.window).ravel()
    n = self.window ** 2
    bias = self.relative_position_bias_table[...][index]
    return jnp.transpose(jnp.reshape(bias, (n, n, self.heads)), (2, 0, 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, dim = x.shape
    m = self.window
    pad_h, pad_w = (-height) % m, (-width) % m
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    full_h, full_w = height + pad_h, width + pad_w
    shift = (0 if m >= full_h else self.shift, 0 if m >= full_w else self.shift)
    if any(shift):
      x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
    windows = window_partition(x, m)                                      # (B nW, N, C)
    tokens, head_dim = windows.shape[1], dim // self.heads
    qkv = jnp.reshape(self.qkv(windows), (-1, tokens, 3, self.heads, head_dim))
    q, k, v = (jnp.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))  # (B nW, H, N, d)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), precision=self.precision)
    logits = logits + self.position_bias().astype(logits.dtype)
    if any(shift):
      mask = jnp.asarray(shift_mask(full_h, full_w, m, shift), logits.dtype)   # (nW, N, N)
      logits = jnp.reshape(logits, (batch, -1, self.heads, tokens, tokens)) + mask[None, :, None]
      logits = jnp.reshape(logits, (-1, self.heads, tokens, tokens))
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.matmul(probs, v, precision=self.precision)                   # (B nW, H, N, d)
    out = self.proj(jnp.reshape(jnp.transpose(out, (0, 2, 1, 3)), (-1, tokens, dim)))
    x = window_merge(out, batch, full_h, full_w, m)
    if any(shift):
      x = jnp.roll(x, shift, axis=(1, 2))
    return x[:, :height, :width]


class Mlp(nnx.Module):
  """``fc1`` -> exact GELU -> ``fc2`` (torchvision's ``mlp.0`` and ``mlp.3``)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, precision: str):
    self.fc1 = Linear(dim, hidden, rngs=rngs, precision=precision)
    self.fc2 = Linear(hidden, dim, rngs=rngs, precision=precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(erf_gelu(self.fc1(x)))


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Per-sample stochastic depth (torchvision's ``row`` mode): keep ``x / (1-rate)`` or 0."""
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class SwinBlock(nnx.Module):
  """``x + attn(LN(x))`` then ``x + mlp(LN(x))``, each branch with stochastic depth."""

  def __init__(self, dim: int, heads: int, window: int, shift: int, drop_rate: float, *,
               config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    norm = dict(epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, **norm)
    self.attn = ShiftedWindowAttention(dim, heads, window, shift, rngs=rngs,
                                       precision=config.precision)
    self.norm2 = nnx.LayerNorm(dim, **norm)
    self.mlp = Mlp(dim, int(dim * config.mlp_ratio), rngs=rngs, precision=config.precision)
    self.drop_rate = drop_rate

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    keys = jax.random.split(key) if key is not None else (None, None)
    x = residual_fence(x)
    x = x + drop_path(self.attn(self.norm1(x)), self.drop_rate, keys[0])
    x = residual_fence(x)
    return x + drop_path(self.mlp(self.norm2(x)), self.drop_rate, keys[1])


class PatchMerging(nnx.Module):
  """2x2 neighbours concatenated (offsets (0,0), (1,0), (0,1), (1,1)) -> LN -> 4C -> 2C."""

  def __init__(self, dim: int, *, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(4 * dim, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              rngs=rngs)
    self.reduction = Linear(4 * dim, 2 * dim, bias=False, rngs=rngs, precision=config.precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1], x.shape[2]
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    return self.reduction(self.norm(jnp.concatenate(parts, axis=-1)))


class PatchEmbed(nnx.Module):
  """``p x p`` stride-``p`` conv (as a GEMM over flattened patches) -> LayerNorm."""

  def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    p, chans, dim = config.patch_size, config.in_chans, config.embed_dim
    fan_in = p * p * chans
    bound = 1.0 / np.sqrt(fan_in)
    init = nnx.initializers.uniform(2 * bound)
    self.kernel = nnx.Param(init(rngs.params(), (p, p, chans, dim)) - bound)  # HWIO
    self.bias = nnx.Param(init(rngs.params(), (dim,)) - bound)
    self.norm = nnx.LayerNorm(dim, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              rngs=rngs)
    self.patch_size, self.precision = p, config.precision

  def __call__(self, images: jax.Array) -> jax.Array:
    batch, height, width, chans = images.shape
    p = self.patch_size
    x = jnp.reshape(images, (batch, height // p, p, width // p, p, chans))
    x = jnp.reshape(jnp.transpose(x, (0, 1, 3, 2, 4, 5)),
                    (batch, height // p, width // p, p * p * chans))
    kernel = jnp.reshape(self.kernel[...], (p * p * chans, -1))
    return self.norm(dense(x, kernel, self.precision) + self.bias[...])


class SwinTransformer(nnx.Module):
  """torchvision's ``SwinTransformer`` (v1): stages of blocks with patch merging between."""

  def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    validate_config(config)
    self.config = config
    self.patch_embed = PatchEmbed(config, rngs)
    total = sum(config.depths)
    stages, merges, index = [], [], 0
    for stage, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
      dim = config.embed_dim * 2 ** stage
      blocks = []
      for i in range(depth):
        rate = config.drop_path * index / max(total - 1, 1)
        shift = 0 if i % 2 == 0 else config.window_size // 2
        blocks.append(SwinBlock(dim, heads, config.window_size, shift, rate, config=config,
                                rngs=rngs))
        index += 1
      stages.append(nnx.List(blocks))
      if stage < len(config.depths) - 1:
        merges.append(PatchMerging(dim, config=config, rngs=rngs))
    self.stages = nnx.List(stages)
    self.merges = nnx.List(merges)
    last = config.embed_dim * 2 ** (len(config.depths) - 1)
    self.norm = nnx.LayerNorm(last, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              rngs=rngs)
    self.head = Linear(last, config.num_classes, rngs=rngs, precision=config.precision)

  def features(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Pooled final features ``(B, C_last)``."""
    _check_images(images, self.config)
    x = self.patch_embed(images)
    keys = iter(jax.random.split(key, sum(self.config.depths)) if key is not None else [])
    for stage, blocks in enumerate(self.stages):
      for block in blocks:
        x = block(x, next(keys, None))
      if stage < len(self.merges):
        x = self.merges[stage](x)
    return jnp.mean(self.norm(x), axis=(1, 2))

  def __call__(self, images: jax.Array, *, train: bool = False,
               key: jax.Array | None = None) -> jax.Array:
    """Logits ``(B, classes)``; ``key`` draws stochastic depth when ``train``."""
    return self.head(self.features(images, key if train else None))


def _check_images(images: jax.Array, config: ml_collections.ConfigDict) -> None:
  expected = (config.img_size, config.img_size, config.in_chans)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(f"Swin expects NHWC images of shape (B, {expected[0]}, {expected[1]}, "
                     f"{expected[2]}), got {tuple(images.shape)}. Transpose NCHW inputs "
                     "with images.transpose(0, 2, 3, 1) or set img_size.")


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs | int = 0
                 ) -> SwinTransformer:
  """Builds the Swin described by ``config`` (float)."""
  if isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  return SwinTransformer(config, rngs)
