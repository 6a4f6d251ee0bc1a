"""Build the quantized DeiT or Swin from a float one, the way the reference does (spec 3,
SWIN.md 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.models.attention import QKRAttention, StandardAttention, qk_product_of
from ofq_jax.models import swin
from ofq_jax.models.deit import create_model
from ofq_jax.models.swin import SwinTransformer
from ofq_jax.models.dtypes import state_dtype
from ofq_jax.models.layers import torch_default_linear_init


def _copy(dst: nnx.Variable, src: nnx.Variable | jax.Array) -> None:
  value = src.get_value() if isinstance(src, nnx.Variable) else src
  if tuple(dst.shape) != tuple(value.shape):
    raise ValueError(f"Cannot copy a {tuple(value.shape)} array into {tuple(dst.shape)}; "
                     "the float model and the config disagree in size.")
  dst.set_value(jnp.asarray(value, dst.dtype))


def _copy_dense(dst, src) -> None:
  _copy(dst.kernel, src.kernel)
  _copy(dst.bias, src.bias)


def _random_dense(dst, key: jax.Array) -> None:
  kernel, bias = torch_default_linear_init(key, *dst.kernel.shape)
  _copy(dst.kernel, kernel)
  _copy(dst.bias, bias)


def quantize_from_float(float_model: nnx.Module, config: ml_collections.ConfigDict, *,
                        seed: int = 0) -> nnx.Module:
  """The quantized DeiT (or Swin) of ``config`` initialised from ``float_model``.

  As the reference: every shared weight is copied; QKR splits ``qkv`` into
  ``q``, ``k``, ``v`` and drops ``b_q``, ``b_k`` (or folds ``b_q`` into a key
  bias with ``quant.qk_bias='fold'``); ``attn.proj`` (and ``qkv`` of standard
  attention) get torch's default random init unless ``quant.attn_proj_init`` /
  ``quant.attn_qkv_init`` is ``'pretrained'`` (spec 7.1); with ``quant.qk_form=
  'product'`` QKR holds ``W_q^T W_k`` itself, computed from the split. Step sizes are
  placeholders until ``calibrate``; move biases start at zero. ``seed`` drives
  the random inits. The quantized state takes the float model's dtype (float32,
  or float64 under ``jax_enable_x64``). A Swin also gets its position tables
  re-drawn (``quant.position_table_init``) and a random bias on each patch-merging
  reduction, which the float model does not have (SWIN.md 5).
  """
  if not config.quant.enabled:
    raise ValueError("quantize_from_float needs config.quant.enabled=True.")
  if getattr(float_model, "family", "deit") == "swin":
    return _quantize_swin(float_model, config, seed)
  model = create_model(config, nnx.Rngs(seed), dtype=state_dtype(float_model))
  src, dst = float_model, model
  if src.config.embed_dim != config.embed_dim or len(src.blocks) != len(dst.blocks):
    raise ValueError(f"Float model (embed_dim={src.config.embed_dim}, depth={len(src.blocks)})"
                     f" does not match the config (embed_dim={config.embed_dim}, depth="
                     f"{config.depth}).")
  keys = iter(jax.random.split(jax.random.key(seed), 2 * len(dst.blocks)))
  _copy(dst.patch_embed.kernel, src.patch_embed.kernel)
  _copy(dst.patch_embed.bias, src.patch_embed.bias)
  for name in ("cls_token", "dist_token", "pos_embed"):
    if (getattr(src, name) is None) != (getattr(dst, name) is None):
      raise ValueError(f"Float and quantized configs disagree on {name} (distilled?).")
    if getattr(dst, name) is not None:
      _copy(getattr(dst, name), getattr(src, name))
  for s_block, d_block in zip(src.blocks, dst.blocks):
    for norm in ("norm1", "norm2"):
      _copy(getattr(d_block, norm).scale, getattr(s_block, norm).scale)
      _copy(getattr(d_block, norm).bias, getattr(s_block, norm).bias)
    _copy_dense(d_block.mlp.fc1, s_block.mlp.fc1)
    _copy_dense(d_block.mlp.fc2, s_block.mlp.fc2)
    _init_attention(d_block.attn, s_block.attn, config.quant, next(keys), next(keys))
  _copy(dst.norm.scale, src.norm.scale)
  _copy(dst.norm.bias, src.norm.bias)
  _copy_dense(dst.head, src.head)
  if dst.head_dist is not None:
    _copy_dense(dst.head_dist, src.head_dist)
  return model


def _init_attention(dst, src: StandardAttention, quant: ml_collections.ConfigDict,
                    qkv_key: jax.Array, proj_key: jax.Array) -> None:
  if quant.attn_proj_init == "pretrained":
    _copy_dense(dst.proj, src.proj)
  else:
    _random_dense(dst.proj, proj_key)
  qkv_kernel = np.asarray(src.qkv.kernel.get_value())
  qkv_bias = np.asarray(src.qkv.bias.get_value())
  dim = qkv_kernel.shape[0]
  if isinstance(dst, QKRAttention):
    if dst.qk_kernel is not None:  # quant.qk_form='product': W_qk from the float W_q, W_k
      _copy(dst.qk_kernel, qk_product_of(jnp.asarray(qkv_kernel[:, :dim]),
                                         jnp.asarray(qkv_kernel[:, dim:2 * dim]),
                                         dst.num_heads, dst.precision))
    else:
      _copy(dst.q_kernel, qkv_kernel[:, :dim])
      _copy(dst.k_kernel, qkv_kernel[:, dim:2 * dim])
    _copy(dst.v_kernel, qkv_kernel[:, 2 * dim:])
    _copy(dst.v_bias, qkv_bias[2 * dim:])
    if dst.key_bias is not None:
      # u_h = W_k,h^T b_q,h with W_k,h the head's rows of torch's W_k (columns here).
      heads, head_dim = dst.num_heads, dst.head_dim
      wk = qkv_kernel[:, dim:2 * dim].reshape(dim, heads, head_dim)
      bq = qkv_bias[:dim].reshape(heads, head_dim)
      _copy(dst.key_bias, np.einsum("che,he->hc", wk, bq))
  elif quant.attn_qkv_init == "pretrained":
    _copy_dense(dst.qkv, src.qkv)
  else:
    _random_dense(dst.qkv, qkv_key)


def _copy_norm(dst: nnx.LayerNorm, src: nnx.LayerNorm) -> None:
  _copy(dst.scale, src.scale)
  _copy(dst.bias, src.bias)


def _quantize_swin(src: SwinTransformer, config: ml_collections.ConfigDict, seed: int
                   ) -> SwinTransformer:
  dst = swin.create_model(config, nnx.Rngs(seed), dtype=state_dtype(src))
  if (src.config.embed_dim, tuple(src.config.depths)) != (config.embed_dim,
                                                          tuple(config.depths)):
    raise ValueError(f"Float Swin (embed_dim={src.config.embed_dim}, depths="
                     f"{tuple(src.config.depths)}) does not match the config (embed_dim="
                     f"{config.embed_dim}, depths={tuple(config.depths)}).")
  blocks = [(s, d) for s_stage, d_stage in zip(src.stages, dst.stages)
            for s, d in zip(s_stage, d_stage)]
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(blocks) + len(dst.merges)))
  _copy(dst.patch_embed.kernel, src.patch_embed.kernel)
  _copy(dst.patch_embed.bias, src.patch_embed.bias)
  _copy_norm(dst.patch_norm, src.patch_norm)
  table_init = nnx.initializers.truncated_normal(stddev=0.02)
  for s_block, d_block in blocks:
    _copy_norm(d_block.norm1, s_block.norm1)
    _copy_norm(d_block.norm2, s_block.norm2)
    _copy_dense(d_block.mlp.fc1, s_block.mlp.fc1)
    _copy_dense(d_block.mlp.fc2, s_block.mlp.fc2)
    _init_attention(d_block.attn, s_block.attn, config.quant, next(keys), next(keys))
    table = d_block.attn.relative_position_bias_table
    table_key = next(keys)
    if config.quant.position_table_init == "pretrained":
      _copy(table, s_block.attn.relative_position_bias_table)
    else:
      _copy(table, table_init(table_key, table.shape, table.dtype))
  for s_merge, d_merge in zip(src.merges, dst.merges):
    _copy_norm(d_merge.norm, s_merge.norm)
    _copy(d_merge.reduction.kernel, s_merge.reduction.kernel)
    _, bias = torch_default_linear_init(next(keys), *d_merge.reduction.kernel.shape)
    _copy(d_merge.reduction.bias, bias)
  _copy_norm(dst.norm, src.norm)
  _copy_dense(dst.head, src.head)
  return dst
