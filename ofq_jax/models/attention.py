"""Self-attention: standard (timm / reference QAttention) and QK-reparameterized (QKR).

Both take ``(B, N, D)`` tokens. ``spec`` governs everything inside the attention
except its output projection, which is a ``QDense`` with its own spec.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ofq_jax import target
from ofq_jax.models.layers import (Levels, Precision, QDense, WeightLevels,
                                   activation_levels, default_kernel_init, move_bias,
                                   per_token, quantized_dense)
from ofq_jax.models.quantizers import LsqQuantizer
from ofq_jax.models.rounded import Rounds, RoundsTensors
from ofq_jax.quant import integer
from ofq_jax.quant.rounding import Rounding
from ofq_jax.quant.rules import QuantSpec


def _maybe_lsq(spec: QuantSpec):
  """A factory of ``spec``'s activation LSQ quantizers, or of ``None`` when acts stay float."""
  def make(**kwargs) -> LsqQuantizer | None:
    if not spec.quantize_acts:
      return None
    return LsqQuantizer(spec.act_bits, grad_batch=spec.grad_batch, **kwargs)
  return make


class Operand(NamedTuple):
  """A product's operand: the value fake-quant multiplies and, when quantized, its
  integer form ``levels * unit + shift`` (``ofq_jax.quant.integer.integer_matmul``).

  ``levels`` stay in the layout they were made in; ``levels_axes`` (None: unmoved) is
  the permutation that gives them this operand's axes, which the integer product reads
  as dot dimensions rather than a transposed copy (``integer._levels_product``)."""
  value: jax.Array
  levels: jax.Array | None = None
  unit: jax.Array | None = None
  shift: jax.Array | None = None
  level_range: tuple[int, int] | None = None
  levels_axes: tuple[int, ...] | None = None

  def split_heads(self, heads: int, head_dim: int) -> Operand:
    """``(..., heads * head_dim)`` parts as ``(..., heads, head_dim)`` (before any
    transpose: the levels are reshaped as stored)."""
    assert self.levels_axes is None, "split heads before transposing"
    split = lambda t: None if t is None else jnp.reshape(t, t.shape[:-1] + (heads, head_dim))
    return Operand(split(self.value), split(self.levels), split(self.unit), split(self.shift),
                   self.level_range)

  def transpose(self, axes: tuple[int, ...]) -> Operand:
    """The same operand with every part's axes permuted (the levels' only on paper)."""
    move = lambda t: None if t is None else jnp.transpose(t, axes)
    stored = self.levels_axes or tuple(range(len(axes)))
    return Operand(move(self.value), self.levels, move(self.unit), move(self.shift),
                   self.level_range,
                   None if self.levels is None else tuple(stored[i] for i in axes))


def quantize_operand(x: jax.Array, quantizer: LsqQuantizer | None,
                     shift: jax.Array | None = None) -> Operand:
  """``quantizer(x) + shift`` with its integer form (just ``x`` when unquantized)."""
  if quantizer is None:
    return Operand(x)
  quantized = quantizer(x)
  unit = quantizer.unit(quantized.shape)
  levels = quantizer.levels(x)
  if shift is not None:  # at the value's rank, so that it moves with the value's axes
    shift = jnp.reshape(shift, (1,) * (quantized.ndim - shift.ndim) + shift.shape)
  value = quantized if shift is None else quantized + shift
  return Operand(value, levels, unit, shift, quantizer.level_range)


def integer_product(spec: QuantSpec, a: Operand, b: Operand, product: str = ""
                    ) -> jax.Array | None:
  """``a @ b`` on integer levels (batched, ``(..., M, K) @ (..., K, N)``), or None when
  ``integer.decide`` keeps fake-quant (fake mode, an unquantized operand, inexact sums)."""
  how = integer.decide(spec, a.value.shape[-1], None if a.levels is None else a.level_range,
                       None if b.levels is None else b.level_range, a.value.dtype, product)
  if how is None:
    return None
  return integer.integer_matmul(a.value, b.value, a.levels, a.unit, a.shift, b.levels, b.unit,
                                b.shift, how, (a.levels_axes, b.levels_axes))


def _scaled(logits: jax.Array, head_dim: int, bias: jax.Array | None) -> jax.Array:
  """``logits * d^-0.5`` (after the product, as the reference), then ``+ bias``."""
  logits = logits * head_dim ** -0.5
  return logits if bias is None else logits + bias.astype(logits.dtype)


def _softmax_probs(logits: jax.Array, quantizer: LsqQuantizer | None) -> Operand:
  return quantize_operand(jax.nn.softmax(logits, axis=-1), quantizer)


def _attend(spec: QuantSpec, probs: Operand, v: Operand, product: str) -> jax.Array:
  """``probs @ v`` per (batch, head): ``(B, H, N, N) @ (B, H, N, d)``."""
  out = integer_product(spec, probs, v, product)
  if out is None:
    out = jnp.einsum("bhij,bhje->bhie", probs.value, v.value, precision=spec.precision)
  return out


class StandardAttention(nnx.Module):
  """Multi-head attention with a fused qkv layer (timm DeiT; reference spec 3.4, 3.6).

  When quantized: ``qkv`` is a QDense (StatsQ or LSQ weights, per-token input
  steps), followed by a move bias on its output, per-token LSQ of q and k,
  per-channel LSQ of v, move biases after each, and unsigned per-query-row LSQ
  of the softmax output.
  """
  product_name = ""  # its module path, set by ``explain.products`` to name its products

  def __init__(self, dim: int, num_heads: int, *, spec: QuantSpec, proj_spec: QuantSpec,
               num_tokens: int, rngs: nnx.Rngs):
    self.spec = spec
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.precision = spec.precision
    dense = dict(rngs=rngs, input_steps=per_token(num_tokens))
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

  def __call__(self, x: jax.Array, logits_bias: jax.Array | None = None) -> jax.Array:
    """``logits_bias`` (broadcastable to ``(B, H, N, N)``) is added after the scaling:
    Swin's relative-position bias and shift mask."""
    batch, tokens, dim = x.shape
    heads, head_dim = self.num_heads, self.head_dim
    qkv = self.qkv(x)
    if self.q_quant is not None:
      qkv = qkv + self.move_qkv_b4[...]
    qkv = jnp.reshape(qkv, (batch, tokens, 3, heads, head_dim))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, d)
    per_head = lambda bias: None if bias is None else jnp.reshape(bias[...], (heads, head_dim))
    acts = self.q_quant is not None
    q = quantize_operand(q, self.q_quant, per_head(self.move_q_aft) if acts else None)
    k = quantize_operand(k, self.k_quant, per_head(self.move_k_aft) if acts else None)
    v = quantize_operand(jnp.reshape(v, (batch, tokens, dim)), self.v_quant,
                         self.move_v_aft[...] if acts else None)
    v = v.split_heads(heads, head_dim)
    q, k, v = (t.transpose((0, 2, 1, 3)) for t in (q, k, v))  # (B, H, N, d)
    logits = integer_product(self.spec, q, k.transpose((0, 1, 3, 2)),
                             f"{self.product_name}.logits")
    if logits is None:
      logits = jnp.einsum("bhie,bhje->bhij", q.value, k.value, precision=self.precision)
    probs = _softmax_probs(_scaled(logits, head_dim, logits_bias), self.softmax_quant)
    out = _attend(self.spec, probs, v, f"{self.product_name}.values")
    return self.proj(jnp.reshape(jnp.transpose(out, (0, 2, 1, 3)), (batch, tokens, dim)))


def _product_columns(wqk: jax.Array) -> jax.Array:
  """``W_qk`` ``(H, D_r, D_c)`` as the ``(D_c, H * D_r)`` kernel of the key-side GEMM."""
  heads, dim, _ = wqk.shape
  return jnp.reshape(jnp.transpose(wqk, (2, 0, 1)), (dim, heads * dim))


def qk_product_of(q_kernel: jax.Array, k_kernel: jax.Array, num_heads: int,
                  precision: Precision) -> jax.Array:
  """QKR's ``W_qk`` ``(H, D, D)`` from the ``(D, D)`` kernels of ``W_q``, ``W_k`` (Flax
  layout, columns head-major): ``[h, r, c] = sum_e W_q[r, h*d+e] W_k[c, h*d+e]``. The one
  expression of the product: the forward, the float-model split and CGA's switch to the
  product form (``cga.include_qk``) all compute it here, so their values agree bit for bit."""
  dim = q_kernel.shape[0]
  head_dim = q_kernel.shape[1] // num_heads
  wq = jnp.reshape(q_kernel, (dim, num_heads, head_dim))
  wk = jnp.reshape(k_kernel, (dim, num_heads, head_dim))
  return jnp.einsum("rhe,che->hrc", wq, wk, precision=precision)


class AttentionNames(NamedTuple):
  """What a QKR attention calls its parameters (their state paths): DeiT's and Swin's by
  default, which are the reference's too; a family with names of its own (Hugging Face's
  ``q_proj`` ... ``o_proj``) sets ``names`` on a subclass. ``v`` is also the name of the
  value kernel's rounding (metrics, CGA targets)."""
  q: str = "q_kernel"
  k: str = "k_kernel"
  v: str = "v_kernel"
  v_bias: str = "v_bias"
  out: str = "proj"  # the output projection, a QDense


class QKRAttention(nnx.Module, RoundsTensors):
  """Query-key reparameterized attention (spec 3.5, the released OFQ recipe).

  Per head the product ``W_qk[h] = W_q,h^T W_k,h`` (D x D) is StatsQ-quantized
  with one scale per (head, row); the query side is the quantized input itself.
  ``q`` and ``k`` have no bias (the reference drops ``b_q``, ``b_k``);
  ``spec.qk_bias='fold'`` adds the trainable per-head key bias ``u_h = W_k,h^T b_q,h``
  so that the pretrained attention is kept exactly (spec item 7.3).

  ``spec.qk_form``: ``'factors'`` (the reference) trains ``q_kernel`` and ``k_kernel`` and
  derives the product every forward; ``'product'`` trains ``qk_kernel`` ``(H, D, D)``,
  the product itself. The reference's CGA cannot anneal a derived product (spec 4.4:
  freezing an entry of ``W_qk`` needs a parameter that is that entry), so
  ``cga.include_qk`` runs CGA in the product form; the forward is the same function
  of ``W_qk`` in both forms. The parameters' names are ``names`` (``AttentionNames``).
  """
  product_name = ""  # its module path, set by ``explain.products`` to name its products
  names = AttentionNames()

  def __init__(self, dim: int, num_heads: int, *, spec: QuantSpec, proj_spec: QuantSpec,
               num_tokens: int, rngs: nnx.Rngs):
    qk_bias, qk_form, precision = spec.qk_bias, spec.qk_form, spec.precision
    if spec.quantize_weights and spec.weight_method != "statsq":
      raise ValueError("attention='qkr' quantizes W_q^T W_k with StatsQ only; got weight "
                       f"method {spec.weight_method!r}. Use attention='standard' for LSQ "
                       "weights.")
    if qk_bias not in ("drop", "fold"):
      raise ValueError(f"qk_bias must be 'drop' (reference) or 'fold', got {qk_bias!r}.")
    if qk_form not in ("factors", "product"):
      raise ValueError(f"qk_form must be 'factors' (reference) or 'product', got {qk_form!r}.")
    self.spec = spec
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.precision = precision
    self.qk_form = qk_form
    init, names = default_kernel_init, self.names
    q_kernel, k_kernel = init(rngs.params(), (dim, dim)), init(rngs.params(), (dim, dim))
    if qk_form == "factors":
      setattr(self, names.q, nnx.Param(q_kernel))
      setattr(self, names.k, nnx.Param(k_kernel))
      self.qk_kernel = None
    else:  # the product of the same draws: one seed gives the same attention in both forms
      setattr(self, names.q, None)
      setattr(self, names.k, None)
      self.qk_kernel = nnx.Param(qk_product_of(q_kernel, k_kernel, num_heads, precision))
    setattr(self, names.v, nnx.Param(init(rngs.params(), (dim, dim))))
    setattr(self, names.v_bias, nnx.Param(jnp.zeros((dim,), jnp.float32)))
    self.key_bias = (nnx.Param(jnp.zeros((num_heads, dim), jnp.float32))
                     if qk_bias == "fold" else None)
    setattr(self, names.out, QDense(dim, dim, spec=proj_spec, rngs=rngs,
                                    input_steps=per_token(num_tokens)))
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
    # One scale per (head, row) of the (H, D, D) product: derived from W_q, W_k in the
    # factors form (no parameter to freeze), the parameter qk_kernel in the product form.
    qk_rounding = Rounding("statsq", bits, (2,))
    qk = (Rounds("qk_product", qk_rounding, param="qk_kernel") if self.qk_form == "product"
          else Rounds("qk_product", qk_rounding, param=None,
                      sources=(self.names.q, self.names.k)))
    return (Rounds(self.names.v, Rounding("statsq", bits, (0,)), param=self.names.v), qk)

  def value(self, name: str) -> jax.Array:
    return self.qk_product() if name == "qk_product" else super().value(name)

  def factor(self, role: str) -> nnx.Param | None:
    """The parameter of ``role`` (a field of ``AttentionNames``: ``q``, ``k``, ``v``,
    ``v_bias``, ``out``) under this attention's ``names``."""
    return getattr(self, getattr(self.names, role))

  def qk_product(self) -> jax.Array:
    """``W_qk`` as ``(H, D, D)``: ``[h, r, c] = sum_e W_q[h*d+e, r] W_k[h*d+e, c]``, or
    the parameter itself in the product form."""
    if self.qk_kernel is not None:
      return self.qk_kernel[...]
    return qk_product_of(self.factor("q")[...], self.factor("k")[...], self.num_heads,
                         self.precision)

  def _weight_levels(self, name: str) -> WeightLevels | None:
    """The integer form of the kernel ``name`` multiplies with: the value kernel ``(D, D)``,
    or the product laid out as ``(D_c, H * D_r)`` (one unit per (head, row))."""
    if not self.spec.quantize_weights:
      return None
    integers = self.weight_integers(name)
    unit = self.weight_unit(name)  # (1, D) or (H, D_r, 1)
    if name == "qk_product":
      integers = _product_columns(integers)
    return WeightLevels(integers, jnp.reshape(unit, (1, -1)),
                        self.declaration(name).rounding.level_range)

  def _softmax_logits(self, xq: jax.Array, x_levels: Levels | None, keys: Operand
                      ) -> jax.Array:
    """``logits[b, h, i, j] = sum_r xq[b, i, r] keys[b, j, h, r]``, batched over b with
    the (j, h) pairs as one axis of columns: one GEMM (integer or fake). The integer form
    leaves out the terms constant along j (the keys' move bias ``a_h`` against every query:
    ``xq_i . a_h`` and ``m . a_h``): the softmax over j is the same without them, and so is
    its gradient (zero for a per-row constant; the float64 parity tests judge ``a_h``'s
    gradient as the rounding noise it is on both sides)."""
    batch, tokens, heads, dim = keys.value.shape
    flat = lambda t: jnp.reshape(t, (t.shape[0], tokens * heads, dim))
    logits = None
    if x_levels is None or keys.levels is None:
      integer.decide(self.spec, dim, None if x_levels is None else x_levels.level_range,
                     None if keys.levels is None else keys.level_range, xq.dtype,
                     f"{self.product_name}.logits")  # recorded: fake-quant, and why
    else:
      # The queries' move bias m is added outside the integer product: m @ keys^T inside
      # it would read the keys transposed (XLA:CPU copied them: 12 ms per DeiT-T block at
      # batch 64). The keys' one, a_h, only adds row constants (docstring): left out.
      query_shift = jnp.reshape(x_levels.shift, (dim,))
      key_values = flat(keys.value - keys.shift)
      queries = Operand(xq - query_shift, x_levels.levels, x_levels.unit, None,
                        x_levels.level_range)
      columns = Operand(key_values, flat(keys.levels),
                        jnp.reshape(keys.unit, (1, tokens * heads, 1)), None,
                        keys.level_range).transpose((0, 2, 1))
      logits = integer_product(self.spec, queries, columns, f"{self.product_name}.logits")
      if logits is not None:
        # m . (keys - a_h) = keys . m - a_h . m: the second is a row constant, and keys . m
        # needs no pass over the keys to subtract a_h.
        query_term = jnp.reshape(
            jnp.matmul(keys.value, query_shift, precision=jax.lax.Precision.HIGHEST),
            (batch, tokens * heads))
        logits = jnp.reshape(logits + query_term[:, None, :], (batch, tokens, tokens, heads))
    if logits is None:
      logits = jnp.einsum("bir,bkr->bik", xq, flat(keys.value), precision=self.precision)
      logits = jnp.reshape(logits, (batch, tokens, tokens, heads))
    return jnp.transpose(logits, (0, 3, 1, 2))

  def _key_gemm(self, xq: jax.Array, x_levels: Levels | None) -> jax.Array:
    """The keys ``(B, N, H, D)`` from one ``(B*N, D) @ (D, H*D)`` GEMM (CPUs)."""
    batch, tokens, dim = xq.shape
    keys = quantized_dense(xq, _product_columns(self.quantized_qk_product()), self.spec,
                           x_levels, self._weight_levels("qk_product"),
                           f"{self.product_name}.keys")
    return jnp.reshape(keys, (batch, tokens, self.num_heads, dim))

  def _key_product(self, xq: jax.Array, x_levels: Levels | None) -> jax.Array:
    """The keys ``(B, N, H, D)`` as one dot of ``xq`` with ``W_qk`` as stored ``(H, D_r,
    D_c)``: no reshape of the product, no split of a flat output (each a copy on a TPU)."""
    wqk = self.quantized_qk_product()
    dims = (((2,), (2,)), ((), ()))
    how = self._integer_plan(x_levels, xq.shape[-1], "keys")
    if how is None:
      return jax.lax.dot_general(xq, wqk, dims, precision=self.precision)
    integers = self.weight_integers("qk_product")  # (H, D_r, D_c)
    unit = jnp.reshape(self.weight_unit("qk_product"), wqk.shape[:2])  # (H, D_r)
    sums = integer.levels_dot(x_levels.levels, integers, dims, how)
    exact = sums.astype(xq.dtype) * x_levels.unit[..., None] * unit
    exact = exact + jnp.einsum("c,hrc->hr", x_levels.shift, wqk,
                               precision=jax.lax.Precision.HIGHEST)
    return integer.exact_product(xq, wqk, exact, dims, how)

  def _logits_product(self, xq: jax.Array, x_levels: Levels | None, keys: Operand
                      ) -> jax.Array:
    """``_softmax_logits`` as one dot over the tensors' own axes, ``(B, N_i, N_j, H)``
    then ``(B, H, N_i, N_j)``; the integer form leaves out the same row constants."""
    dims = (((2,), (3,)), ((0,), (0,)))
    how = self._integer_plan(x_levels, xq.shape[-1], "logits",
                             keys.level_range if keys.levels is not None else None)
    if how is None:
      logits = jax.lax.dot_general(xq, keys.value, dims, precision=self.precision)
    else:
      batch, tokens, heads, _ = keys.value.shape
      sums = integer.levels_dot(x_levels.levels, keys.levels, dims, how)
      key_unit = jnp.reshape(keys.unit, keys.unit.shape[:1] + (1, tokens, heads))
      # m . (keys - a_h) = keys . m - a_h . m; a row constant dropped, as on CPUs.
      query_term = jnp.einsum("bjhr,r->bjh", keys.value, x_levels.shift,
                              precision=jax.lax.Precision.HIGHEST)[:, None]
      exact = sums.astype(xq.dtype) * x_levels.unit[..., None] * key_unit + query_term
      logits = integer.exact_product(xq, keys.value, exact, dims, how)
    return jnp.transpose(logits, (0, 3, 1, 2))

  def _integer_plan(self, x_levels: Levels | None, depth: int, product: str,
                    other: Any = "qk_product") -> integer.IntegerPlan | None:
    """``integer.decide`` for a product of the quantized input with the quantized
    ``W_qk`` (or with levels in the range ``other``; None: unquantized): the exact plan,
    or None to keep fake quantization."""
    if isinstance(other, str):
      other = (self.declaration(other).rounding.level_range if self.spec.quantize_weights
               else None)
    return integer.decide(self.spec, depth, None if x_levels is None else x_levels.level_range,
                          other, jnp.float32 if x_levels is None else x_levels.levels.dtype,
                          f"{self.product_name}.{product}")

  def quantized_qk_product(self) -> jax.Array:
    return self.rounded("qk_product") if self.spec.quantize_weights else self.qk_product()

  def __call__(self, x: jax.Array, logits_bias: jax.Array | None = None) -> jax.Array:
    """``logits_bias`` as in ``StandardAttention``."""
    batch, tokens, dim = x.shape
    heads, head_dim = self.num_heads, self.head_dim
    acts = self.input_quant is not None
    xq, x_levels = x, None
    if acts:
      shifted = x + self.move_b4[...]
      xq = self.input_quant(shifted) + self.move_aft[...]
      x_levels = activation_levels(shifted, self.input_quant, self.move_aft[...])

    value = self.names.v
    v_kernel = self.rounded(value) if self.spec.quantize_weights else self.factor("v")[...]
    v = quantized_dense(xq, v_kernel, self.spec, x_levels, self._weight_levels(value),
                        f"{self.product_name}.v") \
        + self.factor("v_bias")[...]
    v = quantize_operand(v + self.move_v_b4[...] if acts else v, self.v_quant,
                         self.move_v_aft[...] if acts else None)
    v = v.split_heads(heads, head_dim).transpose((0, 2, 1, 3))  # (B, H, N, d)

    # Key side: t[b, j, h, r] = sum_c W_qk[h, r, c] xq[b, j, c], one GEMM over all heads.
    flat = target.platform() == "cpu"  # one 2-D GEMM on CPUs, the tensors' own axes else
    keys = (self._key_gemm(xq, x_levels) if flat else self._key_product(xq, x_levels))
    if acts:
      keys = keys + jnp.reshape(self.move_qkx_b4[...], (heads, dim))
    keys = quantize_operand(keys, self.qkx_quant,
                            jnp.reshape(self.move_qkx_aft[...], (heads, dim)) if acts else None)
    logits = (self._softmax_logits(xq, x_levels, keys) if flat
              else self._logits_product(xq, x_levels, keys))
    if self.key_bias is not None:
      key_term = jnp.einsum("bjc,hc->bhj", xq, self.key_bias[...], precision=self.precision)
      logits = logits + key_term[:, :, None, :]
    probs = _softmax_probs(_scaled(logits, head_dim, logits_bias), self.softmax_quant)
    out = _attend(self.spec, probs, v, f"{self.product_name}.values")
    return self.factor("out")(jnp.reshape(jnp.transpose(out, (0, 2, 1, 3)),
                                          (batch, tokens, dim)))
