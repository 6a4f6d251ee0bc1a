"""Integer-domain matmul of a quantized activation and a quantized weight.

OFQ's numbers are integers in disguise. A quantized activation entering a dense layer is
``x = s_x * k_x + m`` (LSQ: integer levels ``k_x`` times a step ``s_x`` indexed by the
token, i.e. constant along the contracted feature axis, plus the move bias ``m`` added
after the quantizer); a quantized weight is ``w = c_w * k_w`` with one ``c_w`` per output
column (StatsQ: ``c_w = 2 mean|w| / (2n)`` and odd ``k_w = 2k + 1``; LSQ: ``c_w`` its
step). Both scales sit on non-contracted axes, so

    x @ w = s_x * (k_x @ k_w) * c_w + m @ w

where ``k_x @ k_w`` has small-integer operands that int8, bfloat16 or float32 hold
exactly, and a sum that an int32 or float32 accumulator holds exactly while
``K * max|k_x| * max|k_w|`` stays within ``2**31 - 1`` (int32) or ``2**24`` (float32):
the number the reference computes, computed more exactly than float32 fake-quant does.
Past the bound there is no exact integer form and the layer keeps the fake path.

Gradients are the fake path's exactly: ``integer_dense``'s backward is the VJP of
``x @ w`` (the quantizers' straight-through gradients sit outside it), with its own
matmul precision (float32, bf16x3 or bf16).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from ofq_jax import target

MATMULS = ("auto", "fake", "integer")
OPERANDS = ("auto", "float32", "bfloat16", "int8")
BACKWARD_PRECISIONS = {"float32": jax.lax.Precision.HIGHEST, "bf16x3": jax.lax.Precision.HIGH,
                       "bf16": jax.lax.Precision.DEFAULT}
"""The backward matmuls' precision; ``bf16`` also casts their operands to bfloat16
(float32 sums), so that it means one bf16 pass on every platform, the CPU included."""
BACKWARDS = ("auto",) + tuple(BACKWARD_PRECISIONS)

PLATFORM_DEFAULTS = {"tpu": {"matmul": "integer", "matmul_backward": "bf16"}}
"""What ``quant.matmul='auto'`` / ``quant.matmul_backward='auto'`` mean per platform.
On a TPU: integer levels (int8 operands, int32 sums: the forward is the reference's
numbers, exactly) and bf16 backward matmuls, the TPU's one-pass rate, as its float
training runs; float32 there is six bf16 passes, slower to compile and to run
(BENCHMARKS.md, "TPU plans"). Elsewhere: the reference's float32 fake-quant (CPU; GPUs
are not measured yet)."""
ELSEWHERE = {"matmul": "fake", "matmul_backward": "float32"}


def resolve(key: str, value: str) -> str:
  """``quant.<key>`` (``matmul`` or ``matmul_backward``) as the platform traced for runs
  it: ``'auto'`` becomes ``PLATFORM_DEFAULTS``' choice, anything else stays."""
  if value != "auto":
    return value
  return PLATFORM_DEFAULTS.get(target.platform(), ELSEWHERE)[key]

# Largest integer sum an accumulator holds exactly; the integers a dtype holds exactly.
_EXACT_SUM = {"int32": 2 ** 31 - 1, "float32": 2 ** 24, "float64": 2 ** 53}
_EXACT_OPERAND = {"int8": (-128, 127), "bfloat16": (-256, 256), "float32": (-2 ** 24, 2 ** 24),
                  "float64": (-2 ** 53, 2 ** 53)}
_ACCUMULATOR = {"int8": "int32", "bfloat16": "float32", "float32": "float32",
                "float64": "float64"}


@dataclasses.dataclass(frozen=True)
class IntegerPlan:
  """How one product runs: operand and accumulator dtypes, the backward's precision, and
  whether a dense layer's rows are flattened into one GEMM (CPUs: ``layers.dense``)."""
  operand: str
  accumulator: str
  backward: jax.lax.Precision
  flatten: bool = True


@functools.cache
def _cpu_has_bf16_dot() -> bool:
  """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where XLA:CPU's
  bf16 dot measured about 2x its float32 GEMM (BENCHMARKS.md); elsewhere bf16 is emulated."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = f.read()
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def default_operand(platform: str) -> str:
  """The fastest exact operand dtype per platform: int8 on GPUs (int8 tensor cores) and
  TPUs (the MXU multiplies int8 at twice its bf16 rate on v5e, v5p and v6e, at the same
  rate on v4, and int8 operands are half the bytes: ``ofq_jax.plan.chips``), bfloat16
  on CPUs with a hardware bf16 dot (measured about 2x XLA:CPU's float32 GEMM,
  BENCHMARKS.md), else float32."""
  if platform in ("gpu", "cuda", "rocm", "tpu"):
    return "int8"
  if platform == "cpu":
    return "bfloat16" if _cpu_has_bf16_dot() else "float32"
  return "bfloat16"


LevelRange = tuple[int, int]


def _magnitude(levels: LevelRange) -> int:
  return max(abs(levels[0]), abs(levels[1]))


def accumulation_bound(depth: int, x_levels: LevelRange, w_levels: LevelRange) -> int:
  """The largest magnitude a sum of ``depth`` products of such levels can reach."""
  return depth * _magnitude(x_levels) * _magnitude(w_levels)


def _holds(dtype: str, levels: LevelRange) -> bool:
  lo, hi = _EXACT_OPERAND[dtype]
  return lo <= levels[0] and levels[1] <= hi


def plan(depth: int, x_levels: LevelRange, w_levels: LevelRange, *, operand: str = "auto",
         backward: str = "float32", dtype=jnp.float32) -> IntegerPlan | None:
  """The exact plan for a ``depth``-long contraction of integer levels in the ranges
  ``x_levels`` and ``w_levels`` (inclusive), or None when no operand / accumulator pair
  is exact (the caller keeps fake-quant).

  ``operand='auto'`` picks the fastest on the platform traced for (``default_operand`` of
  ``ofq_jax.target.platform()``) and falls back to
  wider dtypes when the levels do not fit. On a CPU every product gains on levels now
  that none reads a transposed copy (``_levels_product``; packed DeiT-S at batch 64 with
  its QKR logits on levels vs float32: 1.69x vs 1.53x the fake-quant eval, BENCHMARKS.md).
  A float64 run uses float64 throughout.
  """
  if operand not in OPERANDS:
    raise ValueError(f"quant.matmul_operands={operand!r} is not one of {OPERANDS}.")
  if backward not in BACKWARD_PRECISIONS:
    raise ValueError(f"quant.matmul_backward={backward!r} is not one of "
                     f"{tuple(BACKWARD_PRECISIONS)}.")
  if jnp.dtype(dtype) == jnp.float64:
    candidates = ["float64"]
  elif operand == "auto":
    first = default_operand(target.platform())
    candidates = ["int8", "bfloat16", "float32"][["int8", "bfloat16", "float32"].index(first):]
  else:
    candidates = [operand]
  bound = accumulation_bound(depth, x_levels, w_levels)
  for name in candidates:
    accumulator = _ACCUMULATOR[name]
    if (_holds(name, x_levels) and _holds(name, w_levels)
        and bound <= _EXACT_SUM[accumulator]):
      return IntegerPlan(name, accumulator, BACKWARD_PRECISIONS[backward],
                         flatten=target.platform() == "cpu")
  return None


@dataclasses.dataclass(frozen=True)
class Decision:
  """How one quantized product runs: on integer levels (``plan``) or as fake-quant,
  ``why`` not."""
  product: str  # the module path and the product, e.g. 'blocks.0.attn.logits'
  plan: IntegerPlan | None
  why: str = ""

  @property
  def path(self) -> str:
    return (f"integer ({self.plan.operand} operands, {self.plan.accumulator} sums)"
            if self.plan else f"fake-quant: {self.why}")


_DECISIONS: contextvars.ContextVar[list[Decision] | None] = contextvars.ContextVar(
    "integer_decisions", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[Decision]]:
  """Collects every product's ``Decision`` made while tracing within the block."""
  decisions: list[Decision] = []
  token = _DECISIONS.set(decisions)
  try:
    yield decisions
  finally:
    _DECISIONS.reset(token)


def note(product: str, how: IntegerPlan | None, why: str = "") -> IntegerPlan | None:
  """Records a product's decision (when ``recording``); returns ``how``."""
  decisions = _DECISIONS.get()
  if decisions is not None:
    decisions.append(Decision(product, how, why))
  return how


def decide(spec: Any, depth: int, a_levels: LevelRange | None, b_levels: LevelRange | None,
           dtype: Any, product: str = "") -> IntegerPlan | None:
  """Whether a product of two operands runs on integer levels: the one place that
  decides it. ``spec`` carries ``matmul``, ``matmul_operands`` and ``matmul_backward``;
  ``a_levels`` / ``b_levels`` are the operands' level ranges (None: not quantized).
  Returns the exact plan, or None for fake-quant; ``recording`` lists the reasons."""
  if spec.matmul != "integer":
    return note(product, None, f"quant.matmul={spec.matmul!r}")
  if a_levels is None and b_levels is None:
    return note(product, None, "a float layer (quant.rules)")
  if a_levels is None or b_levels is None:
    return note(product, None, f"its {'input' if a_levels is None else 'second operand'} "
                               "is not quantized")
  how = plan(depth, a_levels, b_levels, operand=spec.matmul_operands,
             backward=spec.matmul_backward, dtype=dtype)
  if how is None:
    bound = accumulation_bound(depth, a_levels, b_levels)
    return note(product, None, f"its sums (up to {bound:,} for depth {depth}) are not exact in "
                               f"any accumulator quant.matmul_operands="
                               f"{spec.matmul_operands!r} allows")
  return note(product, how)


def integer_levels(value: jax.Array, unit: jax.Array) -> jax.Array:
  """The integer each entry of ``value`` (a multiple of ``unit``) stands for, as floats.

  Exact: a fake-quantized entry is ``fl(k * unit)``, so ``value / unit`` is within a few
  ulps of the integer ``k``, far below the 0.5 that rounding tolerates."""
  return jnp.round(value / unit)


def _as_2d(x: jax.Array) -> jax.Array:
  return jnp.reshape(x, (-1, x.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def integer_dense(x: jax.Array, w: jax.Array, levels_x: jax.Array, unit_x: jax.Array,
                  shift: jax.Array, levels_w: jax.Array, unit_w: jax.Array,
                  how: IntegerPlan) -> jax.Array:
  """``x @ w`` over the last axis of ``x``, computed on integer levels.

  Args:
    x: the layer's input as fake-quant gives it, ``unit_x * levels_x + shift``.
    w: the fake-quantized ``(K, N)`` kernel, ``unit_w * integer levels``.
    levels_x: the integer levels of ``x`` (as floats), shaped like ``x``.
    unit_x: the activation step, broadcastable to ``x`` with size 1 on the last axis.
    shift: the move bias added after the quantizer, ``(K,)`` (zeros when there is none).
    levels_w: the integers of ``w`` (as floats), ``(K, N)``.
    unit_w: ``(1, N)``: the weight's scale per output column.
    how: from ``plan``.

  Only ``x`` and ``w`` receive gradients (the fake path's); the other inputs describe
  them and get zero cotangents.
  """
  lead = x.shape[:-1]
  operand = jnp.dtype(how.operand)
  rows = _as_2d if how.flatten else (lambda t: t)
  sums = jax.lax.dot_general(
      rows(levels_x).astype(operand), levels_w.astype(operand),
      (((levels_x.ndim - 1 if not how.flatten else 1,), (0,)), ((), ())),
      preferred_element_type=jnp.dtype(how.accumulator))
  units = jnp.broadcast_to(unit_x, lead + (1,))
  out = (sums.astype(x.dtype) * (jnp.reshape(units, (-1, 1)) if how.flatten else units)) * unit_w
  out = out + jnp.matmul(shift[None, :], w, precision=jax.lax.Precision.HIGHEST)
  return jnp.reshape(out, lead + (w.shape[-1],))


def _integer_dense_fwd(x, w, levels_x, unit_x, shift, levels_w, unit_w, how):
  out = integer_dense(x, w, levels_x, unit_x, shift, levels_w, unit_w, how)
  return out, (x, w, levels_x, unit_x, shift, levels_w, unit_w)


def _backward_dot(how: IntegerPlan, a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """``lax.dot_general(a, b, dims)`` at the plan's backward precision (``bf16``:
  bfloat16 operands, float32 sums)."""
  if how.backward == jax.lax.Precision.DEFAULT:
    return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                               preferred_element_type=jnp.float32).astype(a.dtype)
  return jax.lax.dot_general(a, b, dims, precision=how.backward)


def _backward_matmul(how: IntegerPlan, a: jax.Array, b: jax.Array) -> jax.Array:
  """A backward matmul at the plan's precision (``bf16``: bfloat16 operands)."""
  if how.backward == jax.lax.Precision.DEFAULT:
    return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32).astype(a.dtype)
  return jnp.matmul(a, b, precision=how.backward)


def _integer_dense_bwd(how, residuals, g):
  x, w, *described = residuals
  zeros = tuple(jnp.zeros_like(a) for a in described)
  if not how.flatten:  # over x's own axes: no (rows, features) copies of x and g
    lead = tuple(range(x.ndim - 1))
    dx = _backward_dot(how, g, w, (((x.ndim - 1,), (1,)), ((), ())))
    dw = _backward_dot(how, x, g, ((lead, lead), ((), ())))
    return (dx, dw) + zeros
  g2 = _as_2d(g)
  dx = jnp.reshape(_backward_matmul(how, g2, w.T), x.shape)
  dw = _backward_matmul(how, _as_2d(x).T, g2)
  return (dx, dw) + zeros


integer_dense.defvjp(_integer_dense_fwd, _integer_dense_bwd)


def _times_shift(a: jax.Array, shift: jax.Array) -> jax.Array:
  """``a @ shift`` for a shift broadcast along the contracted axis (``(..., 1, N)``: a
  row-sum times it) or along the output axis (``(..., K, 1)``: a matrix-vector product)."""
  if shift.shape[-2] == 1:
    return jnp.sum(a, axis=-1, keepdims=True) * shift
  return jnp.matmul(a, shift, precision=jax.lax.Precision.HIGHEST)


Axes = tuple[int, ...] | None


def _levels_product(levels_a: jax.Array, levels_b: jax.Array, axes: tuple[Axes, Axes],
                    how: IntegerPlan) -> jax.Array:
  """``levels_a @ levels_b`` in the plan's operand dtype, each operand given in its own
  memory layout: the logical operand is ``jnp.transpose(levels, axes)`` (None: as is).

  One ``dot_general`` over the stored layouts instead of a transposed copy: XLA:CPU
  upcasts a bf16 dot whose operand is a transpose to float32 (its operand upcaster runs
  before layout assignment), so a product fed ``levels.transpose(...)`` ran in float32
  (DeiT-T packed, softmax @ v: 7.6 ms per block at batch 64 instead of ~6)."""
  operand, accumulator = jnp.dtype(how.operand), jnp.dtype(how.accumulator)
  rank = levels_a.ndim
  axes_a, axes_b = (tuple(range(rank)) if t is None else t for t in axes)
  batch = tuple(range(rank - 2))
  batch_a, batch_b = tuple(axes_a[i] for i in batch), tuple(axes_b[i] for i in batch)
  if [levels_a.shape[i] for i in batch_a] != [levels_b.shape[i] for i in batch_b]:
    # Broadcast batch axes: dot_general has none, so the logical operands it is.
    logical = lambda t, ax: jnp.transpose(t, ax).astype(operand)
    return jnp.matmul(logical(levels_a, axes_a), logical(levels_b, axes_b),
                      preferred_element_type=accumulator)
  dims = (((axes_a[rank - 1],), (axes_b[rank - 2],)), (batch_a, batch_b))
  # dot_general's output: the batch axes, then a's free axis (M), then b's (N).
  return jax.lax.dot_general(levels_a.astype(operand), levels_b.astype(operand), dims,
                             preferred_element_type=accumulator)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def integer_matmul(a: jax.Array, b: jax.Array, levels_a: jax.Array, unit_a: jax.Array,
                   shift_a: jax.Array | None, levels_b: jax.Array, unit_b: jax.Array,
                   shift_b: jax.Array | None, how: IntegerPlan,
                   levels_axes: tuple[Axes, Axes] = (None, None)) -> jax.Array:
  """Batched ``a @ b`` (``(..., M, K) @ (..., K, N)``) computed on integer levels.

  ``a = unit_a * levels_a + shift_a`` with ``unit_a`` of size 1 on the contracted axis
  and ``shift_a`` constant along M (``(..., 1, K)``) or None; ``b = unit_b * levels_b +
  shift_b`` with ``unit_b`` of size 1 on K and ``shift_b`` constant along N
  (``(..., K, 1)``) or along K (``(..., 1, N)``), or None. The shift terms are
  ``a @ shift_b + shift_a @ b - shift_a @ shift_b`` (matrix-vector work, float32).
  ``levels_axes``: each operand's levels as stored, the logical levels being
  ``jnp.transpose(levels, axes)`` (``_levels_product``); values, units and shifts are
  logical. Gradients: the fake matmul's, for ``a`` and ``b`` only.
  """
  sums = _levels_product(levels_a, levels_b, levels_axes, how)
  out = sums.astype(a.dtype) * unit_a * unit_b
  if shift_b is not None:
    out = out + _times_shift(a, shift_b)
  if shift_a is not None:
    out = out + jnp.matmul(shift_a, b, precision=jax.lax.Precision.HIGHEST)
    if shift_b is not None:
      out = out - _times_shift(shift_a, shift_b)
  return out


def _integer_matmul_fwd(a, b, levels_a, unit_a, shift_a, levels_b, unit_b, shift_b, how,
                        levels_axes):
  out = integer_matmul(a, b, levels_a, unit_a, shift_a, levels_b, unit_b, shift_b, how,
                       levels_axes)
  return out, (a, b, levels_a, unit_a, shift_a, levels_b, unit_b, shift_b)


def _integer_matmul_bwd(how, levels_axes, residuals, g):
  del levels_axes
  a, b, *described = residuals
  # Batched with broadcast batch axes: the fake matmul's own transposes do the
  # bookkeeping, at the plan's precision (no bf16 cast here: the dense layers hold most
  # of the FLOPs); no primal product is traced (a plan's census counts every dot).
  product = lambda x, y: jnp.matmul(x, y, precision=how.backward)
  da, = jax.linear_transpose(lambda x: product(x, b), a)(g)
  db, = jax.linear_transpose(lambda y: product(a, y), b)(g)
  return (da, db) + tuple(None if d is None else jnp.zeros_like(d) for d in described)


integer_matmul.defvjp(_integer_matmul_fwd, _integer_matmul_bwd)


def levels_dot(levels_a: jax.Array, levels_b: jax.Array, dims, how: IntegerPlan) -> jax.Array:
  """``lax.dot_general`` of two integer-level tensors in the plan's operand and
  accumulator dtypes: exact sums (``plan`` checked the bound)."""
  operand = jnp.dtype(how.operand)
  return jax.lax.dot_general(levels_a.astype(operand), levels_b.astype(operand), dims,
                             preferred_element_type=jnp.dtype(how.accumulator))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def exact_product(a: jax.Array, b: jax.Array, exact: jax.Array, dims, how: IntegerPlan
                  ) -> jax.Array:
  """``exact``: ``lax.dot_general(a, b, dims)`` as computed from integer levels (units
  and shifts applied), differentiated as that fake product, for ``a`` and ``b`` alone.

  The general form of ``integer_dense`` / ``integer_matmul`` for the layouts an
  accelerator keeps (no flattening): any dot over the operands' own axes. Under a bf16
  backward the residuals are kept in bfloat16, the precision the backward dots read
  them at (half the bytes)."""
  del a, b, dims, how
  return exact


def _exact_product_fwd(a, b, exact, dims, how):
  keep = ((lambda t: t.astype(jnp.bfloat16)) if how.backward == jax.lax.Precision.DEFAULT
          else (lambda t: t))
  return exact, (keep(a), keep(b))


def _exact_product_bwd(dims, how, residuals, g):
  a, b = (t.astype(g.dtype) for t in residuals)
  product = lambda x, y: jax.lax.dot_general(x, y, dims, precision=how.backward)
  # Each operand's cotangent is the transpose of the product linear in it: no primal.
  da, = jax.linear_transpose(lambda x: product(x, b), a)(g)
  db, = jax.linear_transpose(lambda y: product(a, y), b)(g)
  return da, db, None


exact_product.defvjp(_exact_product_fwd, _exact_product_bwd)
