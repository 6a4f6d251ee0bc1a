"""LSQ: learned-step-size quantization of activations and 8-bit weights (spec 2).

``out = round(clip(x / s, Qn, Qp)) * s`` with a learned step ``s``. The step's
value is floored at 1e-5 (gradient passes the floor unchanged) and its gradient
is multiplied by ``g = 1 / sqrt(Qp * M)``, ``M`` being the number of entries that
share one step value in the batch the quantizer sees.

Granularity is an argument, not a class: ``keep_axes`` are the axes that index
the step (per token ``(1,)`` on ``(B, N, C)``, per channel ``(2,)``, per query
row ``(2,)`` on ``(B, H, N, N)``, per (token, head) ``(1, 2)`` on
``(B, N, H, D)``, per tensor ``()``, per colour channel ``(3,)`` on NHWC
images, per output unit ``(1,)`` on a Dense kernel ``(in, out)``); every other
axis shares the step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ofq_jax.quant.shapes import check_bits, keep_axes_shape, reduce_axes_for

STEP_FLOOR = 1e-5
"""Value-only floor on the step size (the reference's ``clip(s, 1e-5)``)."""


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
  """Integer range ``(Qn, Qp)``: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``."""
  bits = check_bits(bits, what="LSQ")
  if signed:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def step_shape(x_shape: tuple[int, ...], keep_axes: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the step parameter: the kept axes' sizes, or ``(1,)`` per tensor."""
  ndim = len(x_shape)
  return tuple(x_shape[a % ndim] for a in keep_axes) or (1,)


def shared_count(x_shape: tuple[int, ...], keep_axes: tuple[int, ...], *,
                 grad_batch: int | None = None, batch_axis: int | None = None) -> int:
  """``M``: entries sharing one step; ``grad_batch`` replaces the batch axis size.

  The reference computes ``M`` from the per-GPU batch; a sharded global batch
  must pass that per-device size here to reproduce its step gradients
  (spec item 7.6).
  """
  ndim = len(x_shape)
  count = 1
  for a in reduce_axes_for(ndim, keep_axes):
    size = x_shape[a]
    if grad_batch is not None and batch_axis is not None and a == batch_axis % ndim:
      size = grad_batch
    count *= size
  return count


@jax.custom_vjp
def lsq_fake_quant(x: jax.Array, step: jax.Array, qn: jax.Array, qp: jax.Array,
                   grad_scale: jax.Array) -> jax.Array:
  """Core LSQ op; ``step`` is already broadcastable to ``x`` (same rank).

  ``qn``, ``qp`` and ``grad_scale`` are arrays so that a range chosen at run
  time (the image quantizer's sticky sign) stays inside one compiled step.
  """
  return lsq_levels(x, step, qn, qp) * floored_step(step)


def floored_step(step: jax.Array) -> jax.Array:
  """The step value LSQ divides by: floored at ``STEP_FLOOR``."""
  return jnp.where(step > STEP_FLOOR, step, STEP_FLOOR)


def lsq_levels(x: jax.Array, step: jax.Array, qn: jax.Array | int, qp: jax.Array | int
               ) -> jax.Array:
  """Integer level ``round(clip(x / s, Qn, Qp))`` (``step`` broadcastable to ``x``)."""
  return jnp.round(jnp.clip(x / floored_step(step), qn, qp))


def _lsq_fwd(x, step, qn, qp, grad_scale):
  return lsq_fake_quant(x, step, qn, qp, grad_scale), (x, step, qn, qp, grad_scale)


def _lsq_bwd(res, g):
  x, step, qn, qp, grad_scale = res
  s = floored_step(step)
  v = x / s
  below, above = v < qn, v > qp
  inside = ~(below | above)  # torch.clamp passes the gradient at the bounds
  gx = jnp.where(inside, g, 0.0)
  # d(round(clip(x/s)) * s)/ds per entry: Qn below, Qp above, round(v) - v inside.
  # Summed per entry (rather than as the product rule's two large, cancelling sums)
  # it is one pass and nearer the exact value.
  dstep = jnp.where(below, qn, jnp.where(above, qp, jnp.round(v) - v))
  shared = tuple(a for a in range(x.ndim) if step.shape[a] == 1 and x.shape[a] != 1)
  gstep = jnp.sum(g * dstep, axis=shared, keepdims=True) * grad_scale
  gstep = jnp.reshape(gstep, step.shape)
  return (gx, gstep.astype(step.dtype), jnp.zeros_like(qn), jnp.zeros_like(qp),
          jnp.zeros_like(grad_scale))


lsq_fake_quant.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quantize(x: jax.Array, step: jax.Array, *, bits: int, signed: bool,
                 keep_axes: tuple[int, ...], grad_batch: int | None = None,
                 batch_axis: int | None = None) -> jax.Array:
  """LSQ fake quantization of ``x`` with the step indexed by ``keep_axes``.

  Args:
    x: the tensor to quantize.
    step: shape ``step_shape(x.shape, keep_axes)``.
    bits, signed: the integer range (``lsq_range``).
    keep_axes: axes of ``x`` that index the step.
    grad_batch, batch_axis: see ``shared_count``.
  """
  qn, qp = lsq_range(bits, signed)
  count = shared_count(x.shape, keep_axes, grad_batch=grad_batch, batch_axis=batch_axis)
  # Constants in the input's dtype: the reference's Python-float scale 1/sqrt(Qp*M) is
  # rounded to float32 in a float32 run and kept in float64 in a float64 run.
  dtype = x.dtype
  return lsq_fake_quant_dynamic(x, step, keep_axes, jnp.asarray(qn, dtype),
                                jnp.asarray(qp, dtype),
                                jnp.asarray(1.0 / math.sqrt(qp * count), dtype))


def lsq_fake_quant_dynamic(x: jax.Array, step: jax.Array, keep_axes: tuple[int, ...],
                           qn: jax.Array, qp: jax.Array, grad_scale: jax.Array) -> jax.Array:
  """``lsq_fake_quant`` with the step given in its parameter shape."""
  expected = step_shape(x.shape, keep_axes)
  if tuple(step.shape) != expected:
    raise ValueError(
        f"LSQ step has shape {tuple(step.shape)} but input {tuple(x.shape)} with "
        f"keep_axes={keep_axes} needs {expected}; the step sizes are tied to the "
        "input shape (e.g. per-token steps fix the number of tokens, spec 7.7).")
  step_b = jnp.reshape(step, keep_axes_shape(x.shape, keep_axes))
  return lsq_fake_quant(x, step_b, qn, qp, grad_scale)


def lsq_initial_step(x: jax.Array, *, qp: int | jax.Array, keep_axes: tuple[int, ...],
                     factor: float = 2.0) -> jax.Array:
  """Data-dependent init ``factor * mean|x| / sqrt(Qp)`` over the shared axes.

  ``factor`` is 2 for signed quantizers and 4 for unsigned (``all_positive``)
  ones; the patch-embedding image quantizer always uses 2 (spec 2.1-2.2).
  """
  ndim = x.ndim
  mean = jnp.mean(jnp.abs(x), axis=reduce_axes_for(ndim, keep_axes))
  step = factor * mean / jnp.sqrt(jnp.asarray(qp, x.dtype))
  return jnp.reshape(jax.lax.stop_gradient(step), step_shape(x.shape, keep_axes))
