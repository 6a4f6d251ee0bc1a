"""Self-attention: standard (timm / reference QAttention) and QK-reparameterized (QKR).

Both take ``(B, N, D)`` tokens. ``spec`` governs everything inside the attention
except its output projection, which is a ``QDense`` with its own spec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ofq_jax.models.layers import (Precision, QDense, WeightLevels, activation_levels,
                                   default_kernel_init, move_bias, quantized_dense)
from ofq_jax.models.quantizers import LsqQuantizer
from ofq_jax.models.rounded import Rounds, RoundsTensors
from ofq_jax.quant.rounding import Rounding
from ofq_jax.quant.rules import QuantSpec


def _maybe_lsq(spec: QuantSpec):
  """A factory of ``spec``'s activation LSQ quantizers, or of ``None`` when acts stay float."""
  def make(**kwargs) -> LsqQuantizer | None:
    if not spec.quantize_acts:
      return None
    return LsqQuantizer(spec.act_bits, grad_batch=spec.grad_batch, **kwargs)
  return make


def _softmax_probs(logits: jax.Array, quantizer: LsqQuantizer | None) -> jax.Array:
  probs = jax.nn.softmax(logits, axis=-1)
  return probs if quantizer is None else quantizer(probs)


class StandardAttention(nnx.Module):
  """Multi-head attention with a fused qkv layer (timm DeiT; reference spec 3.4, 3.6).

  When quantized: ``qkv`` is a QDense (StatsQ or LSQ weights, per-token input
  steps), followed by a move bias on its output, per-token LSQ of q and k,
  per-channel LSQ of v, move biases after each, and unsigned per-query-row LSQ
  of the softmax output.
  """

  def __init__(self, dim: int, num_heads: int, *, spec: QuantSpec, proj_spec: QuantSpec,
               num_tokens: int, rngs: nnx.Rngs, precision: Precision = "highest"):
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.precision = precision
    dense = dict(rngs=rngs, input_step_shape=(num_tokens,), precision=precision)
    self.qkv = QDense(dim, 3 * dim, spec=spec, **dense)
    self.proj = QDense(dim, dim, spec=proj_spec, **dense)
    lsq = _maybe_lsq(spec)
    self.q_quant = lsq(signed=True, step_shape=(num_tokens,), keep_axes=(1,))
    self.k_quant = lsq(signed=True, step_shape=(num_tokens,), keep_axes=(1,))
    self.v_quant = lsq(signed=True, step_shape=(dim,), keep_axes=(2,))
    self.softmax_quant = lsq(signed=False, step_shape=(num_tokens,), keep_axes=(2,))
    if spec.quantize_acts:
      self.move_qkv_b4 = move_bias(3 * dim)
      self.move_q_aft = move_bias(dim)
      self.move_k_aft = move_bias(dim)
      self.move_v_aft = move_bias(dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    heads, head_dim = self.num_heads, self.head_dim
    qkv = self.qkv(x)
    if self.q_quant is not None:
      qkv = qkv + self.move_qkv_b4[...]
    qkv = jnp.reshape(qkv, (batch, tokens, 3, heads, head_dim))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, d)
    if self.q_quant is not None:
      q = jnp.reshape(self.q_quant(q), (batch, tokens, dim)) + self.move_q_aft[...]
      k = jnp.reshape(self.k_quant(k), (batch, tokens, dim)) + self.move_k_aft[...]
      v = self.v_quant(jnp.reshape(v, (batch, tokens, dim))) + self.move_v_aft[...]
      q, k, v = (jnp.reshape(t, (batch, tokens, heads, head_dim)) for t in (q, k, v))
    q, k, v = (jnp.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))  # (B, H, N, d)
    logits = jnp.einsum("bhie,bhje->bhij", q, k, precision=self.precision)
    probs = _softmax_probs(logits * head_dim ** -0.5, self.softmax_quant)
    out = jnp.einsum("bhij,bhje->bhie", probs, v, precision=self.precision)
    return self.proj(jnp.reshape(jnp.transpose(out, (0, 2, 1, 3)), (batch, tokens, dim)))


class QKRAttention(nnx.Module, RoundsTensors):
  """Query-key reparameterized attention (spec 3.5, the released OFQ recipe).

  Per head the product ``W_qk[h] = W_q,h^T W_k,h`` (D x D) is StatsQ-quantized
  with one scale per (head, row); the query side is the quantized input itself.
  ``q`` and ``k`` have no bias (the reference drops ``b_q``, ``b_k``);
  ``qk_bias='fold'`` adds the trainable per-head key bias ``u_h = W_k,h^T b_q,h``
  so that the pretrained attention is kept exactly (spec item 7.3).
  """

  def __init__(self, dim: int, num_heads: int, *, spec: QuantSpec, proj_spec: QuantSpec,
               num_tokens: int, rngs: nnx.Rngs, qk_bias: str = "drop",
               precision: Precision = "highest"):
    if spec.quantize_weights and spec.weight_method != "statsq":
      raise ValueError("attention='qkr' quantizes W_q^T W_k with StatsQ only; got weight "
                       f"method {spec.weight_method!r}. Use attention='standard' for LSQ "
                       "weights.")
    if qk_bias not in ("drop", "fold"):
      raise ValueError(f"qk_bias must be 'drop' (reference) or 'fold', got {qk_bias!r}.")
    self.spec = spec
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.precision = precision
    init = default_kernel_init
    self.q_kernel = nnx.Param(init(rngs.params(), (dim, dim)))
    self.k_kernel = nnx.Param(init(rngs.params(), (dim, dim)))
    self.v_kernel = nnx.Param(init(rngs.params(), (dim, dim)))
    self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.key_bias = (nnx.Param(jnp.zeros((num_heads, dim), jnp.float32))
                     if qk_bias == "fold" else None)
    self.proj = QDense(dim, dim, spec=proj_spec, rngs=rngs, input_step_shape=(num_tokens,),
                       precision=precision)
    lsq = _maybe_lsq(spec)
    self.input_quant = lsq(signed=True, step_shape=(num_tokens,), keep_axes=(1,))
    self.qkx_quant = lsq(signed=True, step_shape=(num_tokens, num_heads), keep_axes=(1, 2))
    self.v_quant = lsq(signed=True, step_shape=(dim,), keep_axes=(2,))
    self.softmax_quant = lsq(signed=False, step_shape=(num_tokens,), keep_axes=(2,))
    if spec.quantize_acts:
      self.move_b4 = move_bias(dim)
      self.move_aft = move_bias(dim)
      self.move_v_b4 = move_bias(dim)
      self.move_v_aft = move_bias(dim)
      self.move_qkx_b4 = move_bias(num_heads * dim)
      self.move_qkx_aft = move_bias(num_heads * dim)

  def rounds(self) -> tuple[Rounds, ...]:
    if not self.spec.quantize_weights:
      return ()
    bits = self.spec.weight_bits
    return (Rounds("v_kernel", Rounding("statsq", bits, (0,)), param="v_kernel"),
            # One scale per (head, row) of the (H, D, D) product; derived, no parameter.
            Rounds("qk_product", Rounding("statsq", bits, (2,)), param=None))

  def value(self, name: str) -> jax.Array:
    return self.qk_product() if name == "qk_product" else super().value(name)

  def qk_product(self) -> jax.Array:
    """``W_qk`` as ``(H, D, D)``: ``[h, r, c] = sum_e W_q[h*d+e, r] W_k[h*d+e, c]``."""
    dim = self.q_kernel.shape[0]
    wq = jnp.reshape(self.q_kernel[...], (dim, self.num_heads, self.head_dim))
    wk = jnp.reshape(self.k_kernel[...], (dim, self.num_heads, self.head_dim))
    return jnp.einsum("rhe,che->hrc", wq, wk, precision=self.precision)

  def _weight_levels(self, name: str) -> WeightLevels | None:
    """The unit per output column of the kernel ``name`` multiplies with: ``v_kernel``
    ``(D, D)``, or the product laid out as ``(D_c, H * D_r)`` (one unit per (head, row))."""
    if not self.spec.quantize_weights:
      return None
    rounding = self.declaration(name).rounding
    unit = rounding.unit(self.value(name))  # (1, D) or (H, D_r, 1)
    return WeightLevels(jnp.reshape(unit, (1, -1)), rounding.level_range)

  def quantized_qk_product(self) -> jax.Array:
    return self.rounded("qk_product") if self.spec.quantize_weights else self.qk_product()

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    heads, head_dim = self.num_heads, self.head_dim
    acts = self.input_quant is not None
    xq, x_levels = x, None
    if acts:
      quantized = self.input_quant(x + self.move_b4[...])
      xq = quantized + self.move_aft[...]
      x_levels = activation_levels(quantized, self.input_quant, self.move_aft[...])

    v_kernel = self.rounded("v_kernel") if self.spec.quantize_weights else self.v_kernel[...]
    v = quantized_dense(xq, v_kernel, self.precision, self.spec, x_levels,
                        self._weight_levels("v_kernel")) + self.v_bias[...]
    if acts:
      v = self.v_quant(v + self.move_v_b4[...]) + self.move_v_aft[...]
    v = jnp.transpose(jnp.reshape(v, (batch, tokens, heads, head_dim)), (0, 2, 1, 3))

    # Key side: t[b, j, h, r] = sum_c W_qk[h, r, c] xq[b, j, c], one GEMM over all heads.
    wqk = self.quantized_qk_product()  # (H, D_r, D_c)
    wqk_2d = jnp.reshape(jnp.transpose(wqk, (2, 0, 1)), (dim, heads * dim))
    keys = quantized_dense(xq, wqk_2d, self.precision, self.spec, x_levels,
                           self._weight_levels("qk_product"))
    keys = jnp.reshape(keys, (batch, tokens, heads, dim))
    if acts:
      keys = keys + jnp.reshape(self.move_qkx_b4[...], (heads, dim))
      keys = self.qkx_quant(keys) + jnp.reshape(self.move_qkx_aft[...], (heads, dim))
    # logits[b, h, i, j] = sum_r xq[b, i, r] t[b, j, h, r]: batched over b with the
    # (h, j) pairs as one axis of columns.
    keys_t = jnp.reshape(keys, (batch, tokens * heads, dim))
    logits = jnp.einsum("bir,bkr->bik", xq, keys_t, precision=self.precision)
    logits = jnp.transpose(jnp.reshape(logits, (batch, tokens, tokens, heads)), (0, 3, 1, 2))
    if self.key_bias is not None:
      key_term = jnp.einsum("bjc,hc->bhj", xq, self.key_bias[...], precision=self.precision)
      logits = logits + key_term[:, :, None, :]
    probs = _softmax_probs(logits * head_dim ** -0.5, self.softmax_quant)
    out = jnp.einsum("bhij,bhje->bhie", probs, v, precision=self.precision)
    return self.proj(jnp.reshape(jnp.transpose(out, (0, 2, 1, 3)), (batch, tokens, dim)))
