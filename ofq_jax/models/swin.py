"""Swin Transformer (torchvision's ``swin_t`` family) as Flax NNX modules: the float model.

``model_config('tiny')`` is torchvision's ``swin_t``: patch 4, embed 96, depths 2-2-6-2,
heads 3-6-12-24, window 7, LayerNorm eps 1e-5 (``'small'``: ``swin_s``, depths 2-2-18-2;
``'base'``: ``swin_b``, embed 128, heads 4-8-16-32). ``create_model(config, rngs)`` builds it,
float or quantized (``config.quant``: variants ``attention='qkr'`` (released) and
``'standard'`` (the reference's ``statsq``), StatsQ weights only);
``model(images_nhwc, train=...)`` returns the logits of its one head. The layers are
DeiT's (``QDense``, ``Mlp``, ``PatchEmbed``, the two attentions, with Swin's step
granularities: per window token in attention, per feature-map column in the MLPs and
reductions); names map to torchvision's and the reference's in ``ofq_jax.interop``.

What torchvision does and this module does too: shifted windows (roll by ``-M//2``)
with the -100 mask between regions of the rolled map, the shift switched off per axis
when the padded map is no larger than the window, relative-position bias
``table[(dr + M-1) * (2M-1) + (dc + M-1)]``, patch merging concatenating the sub-grids
``(0,0), (1,0), (0,1), (1,1)`` (row, column offsets) before its LayerNorm and bias-free
reduction, stochastic depth per sample growing linearly over the blocks, mean pooling
and one head; the attention scales after the product (the reference; torchvision
scales q first, a float-rounding difference). The shift switch-off is decided per call
from the (static) map size, which equals the reference's persistent switch-off at a
fixed input size (SWIN.md 6.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.errors import UserError
from ofq_jax.models.attention import QKRAttention, StandardAttention
from ofq_jax.models.deit import block_kinds
from ofq_jax.models.config import (check_images, check_patches_and_precision, check_qk_form,
                                   family_config)
from ofq_jax.models.quant_keys import check_quant
from ofq_jax.models.dtypes import build
from ofq_jax.models import from_float
from ofq_jax.models.family import Family, TorchNames
from ofq_jax.models.fences import residual_fence
from ofq_jax.models.layers import (PER_TENSOR, Mlp, PatchEmbed, QDense, per_column,
                                   torch_default_linear_init)
from ofq_jax.quant.rules import QuantRules, QuantSpec

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
}
"""torchvision's ``swin_t``, ``swin_s`` and ``swin_b`` (v1, 224 px)."""
MASKED = -100.0
"""What torchvision adds to the logits of token pairs from different regions of a rolled map."""


FIELDS: dict[str, Any] = dict(
    arch="swin", size=None, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
    window_size=7, patch_size=4, img_size=224, in_chans=3, mlp_ratio=4.0, num_classes=1000,
    layer_norm_eps=1e-5,
    drop_path=0.0,  # stochastic depth of the last block (torchvision's swin_t: 0.2; OFQ: 0)
    precision="highest",
)
"""A Swin config's fields besides ``quant`` (whose ``position_table_init`` is the
reference quirk, SWIN.md 5, of re-drawing every relative-position table when quantizing),
at Swin-T's values."""


def model_config(size: str | None = None, **overrides: Any) -> ml_collections.ConfigDict:
  """Swin config: a preset (``tiny``, ``small``, ``base`` = torchvision's ``swin_t``,
  ``swin_s``, ``swin_b``; or None) plus overrides."""
  config = family_config("swin", FIELDS, PRESETS, size, overrides)
  config.depths = tuple(config.depths)
  config.num_heads = tuple(config.num_heads)
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
  check_patches_and_precision(config)
  if not 0.0 <= config.drop_path < 1.0:
    raise UserError(f"drop_path={config.drop_path!r} is not in [0, 1).")
  quant = config.quant
  check_quant(quant, "swin")
  if quant.enabled and quant.weight_method != "statsq":
    raise UserError(f"model.quant.weight_method={quant.weight_method!r}: Swin has no LSQ-weight "
                    "baseline (the reference refuses it); use 'statsq'.")
  check_qk_form(quant)


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


def window_attention(module: nnx.Module, x: jax.Array,
                     attend: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Shifted-window attention on a ``(B, H, W, C)`` map around ``attend(windows, bias)``.

  Pads right/bottom to multiples of the window, switches the shift off per axis
  where the padded map is no larger than the window, rolls by ``-shift``, attends
  within windows with the relative-position bias (and the shift mask), and undoes
  all of it.
  """
  batch, height, width, _ = x.shape
  m = module.window
  pad_h, pad_w = (-height) % m, (-width) % m
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  full_h, full_w = height + pad_h, width + pad_w
  shift = (0 if m >= full_h else module.shift, 0 if m >= full_w else module.shift)
  if any(shift):
    x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
  windows = window_partition(x, m)                                        # (B nW, N, C)
  bias = position_bias(module.relative_position_bias_table[...], m)[None]  # (1, H, N, N)
  if any(shift):
    mask = jnp.asarray(shift_mask(full_h, full_w, m, shift), bias.dtype)   # (nW, N, N)
    bias = bias + jnp.tile(mask, (batch, 1, 1))[:, None]                  # (B nW, H, N, N)
  x = window_merge(attend(windows, bias), batch, full_h, full_w, m)
  if any(shift):
    x = jnp.roll(x, shift, axis=(1, 2))
  return x[:, :height, :width]


def position_bias(table: jax.Array, window: int) -> jax.Array:
  """``(H, N, N)`` bias read from the ``((2M-1)^2, H)`` table."""
  n = window * window
  bias = table[relative_position_index(window).ravel()]
  return jnp.transpose(jnp.reshape(bias, (n, n, table.shape[-1])), (2, 0, 1))


def _position_table(rngs: nnx.Rngs, window: int, heads: int) -> nnx.Param:
  init = nnx.initializers.truncated_normal(stddev=0.02)
  return nnx.Param(init(rngs.params(), ((2 * window - 1) ** 2, heads)))


class SwinAttention(StandardAttention):
  """Window attention with a fused ``qkv`` (float Swin, and the ``statsq`` variant)."""

  def __init__(self, dim: int, heads: int, window: int, shift: int, *, spec: QuantSpec,
               proj_spec: QuantSpec, rngs: nnx.Rngs):
    super().__init__(dim, heads, spec=spec, proj_spec=proj_spec, num_tokens=window * window,
                     rngs=rngs)
    self.relative_position_bias_table = _position_table(rngs, window, heads)
    self.window, self.shift = window, shift

  def __call__(self, x: jax.Array) -> jax.Array:
    return window_attention(self, x, lambda w, b: StandardAttention.__call__(self, w, b))


class SwinQKRAttention(QKRAttention):
  """Window attention with query-key reparameterization (the ``qkr`` variant)."""

  def __init__(self, dim: int, heads: int, window: int, shift: int, *, spec: QuantSpec,
               proj_spec: QuantSpec, rngs: nnx.Rngs):
    super().__init__(dim, heads, spec=spec, proj_spec=proj_spec, num_tokens=window * window,
                     rngs=rngs)
    self.relative_position_bias_table = _position_table(rngs, window, heads)
    self.window, self.shift = window, shift

  def __call__(self, x: jax.Array) -> jax.Array:
    return window_attention(self, x, lambda w, b: QKRAttention.__call__(self, w, b))


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Per-sample stochastic depth (torchvision's ``row`` mode): keep ``x / (1-rate)`` or 0."""
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def _per_window_batch(spec: QuantSpec, windows: int) -> QuantSpec:
  """``spec`` with ``grad_batch`` (images, ``quant.lsq_grad_batch``) counted in windows."""
  if spec.grad_batch is None:
    return spec
  return dataclasses.replace(spec, grad_batch=spec.grad_batch * windows)


class BlockPlace(NamedTuple):
  """Where a block sits: its width, heads and feature map, its window shift and its
  stochastic-depth rate."""
  dim: int
  heads: int
  map_width: int
  shift: int
  drop_rate: float


class SwinBlock(nnx.Module):
  """``x + attn(LN(x))`` then ``x + mlp(LN(x))``, each branch with stochastic depth."""

  def __init__(self, config: ml_collections.ConfigDict, rules: QuantRules, prefix: str,
               place: BlockPlace, *, rngs: nnx.Rngs):
    dim = place.dim
    norm = dict(epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, **norm)
    # Attention quantizers see windows as the batch: B * nW rows per image batch.
    windows = (-(-place.map_width // config.window_size)) ** 2
    attn_cls = SwinQKRAttention if (config.quant.enabled and config.quant.attention == "qkr") \
        else SwinAttention
    self.attn = attn_cls(dim, place.heads, config.window_size, place.shift,
                         spec=_per_window_batch(rules(f"{prefix}.attn"), windows),
                         proj_spec=_per_window_batch(rules(f"{prefix}.attn.proj"), windows),
                         rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, **norm)
    self.mlp = Mlp(dim, int(dim * config.mlp_ratio), fc1_spec=rules(f"{prefix}.mlp.fc1"),
                   fc2_spec=rules(f"{prefix}.mlp.fc2"), input_steps=per_column(place.map_width),
                   rngs=rngs)
    self.drop_rate = place.drop_rate

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    keys = jax.random.split(key) if key is not None else (None, None)
    x = residual_fence(x)
    x = x + drop_path(self.attn(self.norm1(x)), self.drop_rate, keys[0])
    x = residual_fence(x)
    return x + drop_path(self.mlp(self.norm2(x)), self.drop_rate, keys[1])


class PatchMerging(nnx.Module):
  """2x2 neighbours concatenated (offsets (0,0), (1,0), (0,1), (1,1)) -> LN -> 4C -> 2C.

  The float reduction has no bias; the quantized one has (the reference's QLinear
  always builds one), with per-column input steps on the ``(B, H/2, W/2, 4C)`` map.
  """

  def __init__(self, dim: int, map_width: int, *, spec: QuantSpec,
               config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(4 * dim, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              rngs=rngs)
    quantized = spec.quantize_weights or spec.quantize_acts
    self.reduction = QDense(4 * dim, 2 * dim, spec=spec, rngs=rngs,
                            input_steps=per_column((map_width + 1) // 2), use_bias=quantized)

  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1], x.shape[2]
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    return self.reduction(self.norm(jnp.concatenate(parts, axis=-1)))


class SwinTransformer(nnx.Module):
  """torchvision's ``SwinTransformer`` (v1): stages of blocks with patch merging between;
  quantized where ``config.quant`` rules say so (module paths in ``ofq_jax.quant.rules``)."""

  family = "swin"

  def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    validate_config(config)
    self.config = config
    rules = QuantRules.from_config(config.quant, FAMILY, config.precision)
    dim = config.embed_dim
    self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim,
                                  spec=rules("patch_embed.proj"), rngs=rngs)
    self.patch_norm = nnx.LayerNorm(dim, epsilon=config.layer_norm_eps,
                                    use_fast_variance=False, rngs=rngs)
    total = sum(config.depths)
    width = config.img_size // config.patch_size
    stages, merges, index = [], [], 0
    for s, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
      blocks = []
      for i in range(depth):
        place = BlockPlace(dim, heads, width, 0 if i % 2 == 0 else config.window_size // 2,
                           config.drop_path * index / max(total - 1, 1))
        blocks.append(SwinBlock(config, rules, f"stages.{s}.{i}", place, rngs=rngs))
        index += 1
      stages.append(nnx.List(blocks))
      if s < len(config.depths) - 1:
        merges.append(PatchMerging(dim, width, spec=rules(f"merges.{s}.reduction"),
                                   config=config, rngs=rngs))
        dim, width = 2 * dim, (width + 1) // 2
    self.stages = nnx.List(stages)
    self.merges = nnx.List(merges)
    self.norm = nnx.LayerNorm(dim, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              rngs=rngs)
    self.head = QDense(dim, config.num_classes, spec=rules("head"), rngs=rngs,
                       input_steps=PER_TENSOR)
    rules.check_all_matched()

  def features(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Pooled final features ``(B, C_last)``."""
    check_images(images, self.config, "Swin")
    side = self.config.img_size // self.config.patch_size
    x = self.patch_embed(images)
    x = self.patch_norm(jnp.reshape(x, (x.shape[0], side, side, x.shape[-1])))
    keys = iter(jax.random.split(key, sum(self.config.depths)) if key is not None else [])
    for s, blocks in enumerate(self.stages):
      for block in blocks:
        x = block(x, next(keys, None))
      if s < len(self.merges):
        x = self.merges[s](x)
    return jnp.mean(self.norm(x), axis=(1, 2))

  def __call__(self, images: jax.Array, *, train: bool = False,
               key: jax.Array | None = None) -> jax.Array:
    """Logits ``(B, classes)``; ``key`` draws stochastic depth when ``train``."""
    return self.head(self.features(images, key if train else None))


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs | int = 0, *,
                 dtype: Any = None) -> SwinTransformer:
  """Builds the (float or quantized) Swin described by ``config``; ``dtype`` as DeiT's."""
  return build(SwinTransformer, config, rngs, dtype)


def copy_from_float(src: SwinTransformer, dst: SwinTransformer,
                    quant: ml_collections.ConfigDict, seed: int) -> None:
  """``Family.from_float`` of Swin (SWIN.md 5): DeiT's copy per block, plus each block's
  position table re-drawn (``quant.position_table_init``) and a random bias on each
  patch-merging reduction, which the float model does not have; keys of ``seed``, three
  per block then one per merge."""
  if (src.config.embed_dim, tuple(src.config.depths)) != (dst.config.embed_dim,
                                                          tuple(dst.config.depths)):
    raise ValueError(f"Float Swin (embed_dim={src.config.embed_dim}, depths="
                     f"{tuple(src.config.depths)}) does not match the config (embed_dim="
                     f"{dst.config.embed_dim}, depths={tuple(dst.config.depths)}).")
  blocks = [(s, d) for s_stage, d_stage in zip(src.stages, dst.stages)
            for s, d in zip(s_stage, d_stage)]
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(blocks) + len(dst.merges)))
  from_float.copy(dst.patch_embed.kernel, src.patch_embed.kernel)
  from_float.copy(dst.patch_embed.bias, src.patch_embed.bias)
  from_float.copy_norm(dst.patch_norm, src.patch_norm)
  table_init = nnx.initializers.truncated_normal(stddev=0.02)
  for s_block, d_block in blocks:
    from_float.copy_norm(d_block.norm1, s_block.norm1)
    from_float.copy_norm(d_block.norm2, s_block.norm2)
    from_float.copy_dense(d_block.mlp.fc1, s_block.mlp.fc1)
    from_float.copy_dense(d_block.mlp.fc2, s_block.mlp.fc2)
    from_float.init_attention(d_block.attn, s_block.attn, quant, next(keys), next(keys))
    table = d_block.attn.relative_position_bias_table
    table_key = next(keys)
    if quant.position_table_init == "pretrained":
      from_float.copy(table, s_block.attn.relative_position_bias_table)
    else:
      from_float.copy(table, table_init(table_key, table.shape, table.dtype))
  for s_merge, d_merge in zip(src.merges, dst.merges):
    from_float.copy_norm(d_merge.norm, s_merge.norm)
    from_float.copy(d_merge.reduction.kernel, s_merge.reduction.kernel)
    _, bias = torch_default_linear_init(next(keys), *d_merge.reduction.kernel.shape)
    from_float.copy(d_merge.reduction.bias, bias)
  from_float.copy_norm(dst.norm, src.norm)
  from_float.copy_dense(dst.head, src.head)


def position_indices(model: SwinTransformer) -> dict[str, np.ndarray]:
  """Each block's ``relative_position_index`` as torch stores it (flattened, int64), by
  ofq_jax path: torchvision and the reference keep it as a buffer, ofq_jax derives it."""
  index = relative_position_index(model.config.window_size).ravel().astype(np.int64)
  return {f"stages.{s}.{i}.attn.relative_position_index": index
          for s, blocks in enumerate(model.stages) for i in range(len(blocks))}


# torchvision names stage s ``features.{2s+1}`` and the merge after it ``features.{2s+2}``;
# the patch embedding is ``features.0.0`` and its norm ``features.0.2``.
_FEATURES = ((r"^patch_norm\.", "features.0.2."), (r"^patch_embed\.", "features.0.0."),
             (r"^stages\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 1}."),
             (r"^merges\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 2}."))


FAMILY = Family(
    "swin", create_model, model_config, PRESETS,
    edge_layers=r"patch_embed\.proj|head",
    block_layers=r"(stages\.\d+\.\d+|merges\.\d+)\..*",
    # The reference's for a QKR Swin: fc1, fc2, proj, v and every patch-merging reduction
    # (its module-name test, SWIN.md 8.2). For the ``statsq`` Swin that test selects
    # nothing (it wants ``blocks`` in the name), so the reference's CGA freezes no weight.
    cga_targets=(r"stages\.\d+\.\d+\.(mlp\.fc1\.kernel|mlp\.fc2\.kernel|"
                 r"attn\.proj\.kernel|attn\.v_kernel)|merges\.\d+\.reduction\.kernel"),
    shape_keys="size, embed_dim, depths, num_heads, window_size, num_classes, img_size",
    kinds=block_kinds(r"stages\.\d+\.\d+") + (
        ("reduction", r"merges\.\d+\.reduction\.kernel"),
        ("patch_embed", r"patch_embed\..*"), ("head", r"head\.kernel")),
    blocks=r"stages\.\d+\.\d+",
    # torchvision's MLP is ``mlp.0`` / ``mlp.3``; the reference's quantized Swin keeps
    # ``mlp.fc1`` / ``mlp.fc2`` (SWIN.md).
    torch=TorchNames(reference=_FEATURES,
                     float=_FEATURES + ((r"\.mlp\.fc1\.", ".mlp.0."),
                                        (r"\.mlp\.fc2\.", ".mlp.3.")),
                     float_format="torchvision Swin", buffers=position_indices),
    from_float=copy_from_float)
"""Swin's module paths: ``patch_embed.proj``, ``stages.{s}.{i}.attn``,
``stages.{s}.{i}.attn.proj``, ``stages.{s}.{i}.mlp.fc1`` / ``fc2``,
``merges.{s}.reduction``, ``head``."""
