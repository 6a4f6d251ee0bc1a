"""Copying a float model's weights into a quantized one, the way the reference does
(spec 3, 7.1): the pieces each family's ``Family.from_float`` is made of."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.models.attention import QKRAttention, StandardAttention, qk_product_of
from ofq_jax.models.layers import torch_default_linear_init


def copy(dst: nnx.Variable, src: nnx.Variable | jax.Array) -> None:
  """``dst = src`` in ``dst``'s dtype; a shape mismatch is an error naming both shapes."""
  value = src.get_value() if isinstance(src, nnx.Variable) else src
  if tuple(dst.shape) != tuple(value.shape):
    raise ValueError(f"Cannot copy a {tuple(value.shape)} array into {tuple(dst.shape)}; "
                     "the float model and the config disagree in size.")
  dst.set_value(jnp.asarray(value, dst.dtype))


def copy_dense(dst, src) -> None:
  """Kernel and bias of a dense layer."""
  copy(dst.kernel, src.kernel)
  copy(dst.bias, src.bias)


def copy_norm(dst: nnx.LayerNorm, src: nnx.LayerNorm) -> None:
  copy(dst.scale, src.scale)
  copy(dst.bias, src.bias)


def random_dense(dst, key: jax.Array) -> None:
  """torch's default ``nn.Linear`` init, which the reference gives re-created layers."""
  kernel, bias = torch_default_linear_init(key, *dst.kernel.shape)
  copy(dst.kernel, kernel)
  copy(dst.bias, bias)


def init_attention(dst, src: StandardAttention, quant: ml_collections.ConfigDict,
                   qkv_key: jax.Array, proj_key: jax.Array) -> None:
  """A quantized attention from a float (fused qkv) one: QKR splits ``qkv`` into ``q``,
  ``k``, ``v`` and drops ``b_q``, ``b_k`` (or folds ``b_q`` into a key bias with
  ``quant.qk_bias='fold'``); ``proj`` (and a standard attention's ``qkv``) get torch's
  default random init unless ``quant.attn_proj_init`` / ``attn_qkv_init`` is
  ``'pretrained'``; with ``quant.qk_form='product'`` QKR holds ``W_q^T W_k`` itself."""
  qkr = isinstance(dst, QKRAttention)
  out = dst.factor("out") if qkr else dst.proj
  if quant.attn_proj_init == "pretrained":
    copy_dense(out, src.proj)
  else:
    random_dense(out, proj_key)
  qkv_kernel = np.asarray(src.qkv.kernel.get_value())
  qkv_bias = np.asarray(src.qkv.bias.get_value())
  dim = qkv_kernel.shape[0]
  if qkr:
    if dst.qk_kernel is not None:  # quant.qk_form='product': W_qk from the float W_q, W_k
      copy(dst.qk_kernel, qk_product_of(jnp.asarray(qkv_kernel[:, :dim]),
                                        jnp.asarray(qkv_kernel[:, dim:2 * dim]),
                                        dst.num_heads, dst.precision))
    else:
      copy(dst.factor("q"), qkv_kernel[:, :dim])
      copy(dst.factor("k"), qkv_kernel[:, dim:2 * dim])
    copy(dst.factor("v"), qkv_kernel[:, 2 * dim:])
    copy(dst.factor("v_bias"), qkv_bias[2 * dim:])
    if dst.key_bias is not None:
      # u_h = W_k,h^T b_q,h with W_k,h the head's rows of torch's W_k (columns here).
      heads, head_dim = dst.num_heads, dst.head_dim
      wk = qkv_kernel[:, dim:2 * dim].reshape(dim, heads, head_dim)
      bq = qkv_bias[:dim].reshape(heads, head_dim)
      copy(dst.key_bias, np.einsum("che,he->hc", wk, bq))
  elif quant.attn_qkv_init == "pretrained":
    copy_dense(dst.qkv, src.qkv)
  else:
    random_dense(dst.qkv, qkv_key)
