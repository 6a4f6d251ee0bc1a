"""StatsQ: the weight quantizer whose scale is a statistic, not a parameter (spec 1).

Per output unit the scale is ``s = 2 * mean|w|`` over the input axes, detached.
Weights are normalised by ``s``, clipped to ``[-1, 1 - 1e-6]`` and put on a
symmetric mid-rise grid with ``2**bits`` levels ``s * (k + 0.5) / n``,
``n = 2**(bits - 1)``. The gradient is the identity for every entry (no clip
mask, nothing into the scale).

Layouts: ``reduce_axes`` names the axes averaged into one scale. A Flax Dense
kernel ``(in, out)`` uses ``(0,)`` (one scale per output column, which is the
reference's per-row rule on torch's ``(out, in)``); the QKR product
``(heads, D, D)`` uses ``(-1,)`` (one scale per (head, row)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ofq_jax.quant.shapes import check_bits

CLIP_UPPER = 1.0 - 1e-6
"""Upper clip bound of the normalised weight; stops the top level rounding to n."""


def statsq_scale(w: jax.Array, reduce_axes: tuple[int, ...] = (0,)) -> jax.Array:
  """``2 * mean|w|`` over ``reduce_axes`` (kept as size-1 axes), detached."""
  scale = 2.0 * jnp.mean(jnp.abs(w), axis=reduce_axes, keepdims=True)
  return jax.lax.stop_gradient(scale)


def statsq_pre_round(w: jax.Array, bits: int, reduce_axes: tuple[int, ...] = (0,)
                     ) -> tuple[jax.Array, jax.Array]:
  """The value StatsQ rounds, ``t = clip(w / s) * n - 0.5``, and the scale ``s``.

  ``round(t)`` is the integer level ``k`` in ``{-n, ..., n - 1}``; rounding
  thresholds sit at half-integers of ``t``. CGA and the oscillation tracker
  work on ``t`` and ``k``.
  """
  scale = statsq_scale(w, reduce_axes)
  return statsq_pre_round_at(w, scale, bits), scale


def statsq_pre_round_at(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """``t = clip(w / scale) * n - 0.5`` for a given (broadcastable) ``scale``: StatsQ's
  own with ``2 mean|w|``, or a frozen one (the fixed-grid oscillation tracker)."""
  n = float(2 ** (check_bits(bits, what="StatsQ weight") - 1))
  clipped = jnp.clip(w / scale, -1.0, CLIP_UPPER)
  return clipped * n - 0.5


def statsq_levels(w: jax.Array, bits: int, reduce_axes: tuple[int, ...] = (0,)) -> jax.Array:
  """Integer level ``k`` of every weight (``jnp.round`` is half-to-even, like torch)."""
  t, _ = statsq_pre_round(w, bits, reduce_axes)
  return jnp.round(t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def statsq_quantize(w: jax.Array, bits: int, reduce_axes: tuple[int, ...] = (0,)) -> jax.Array:
  """Fake-quantized weights with an identity straight-through gradient (spec 1.1)."""
  n = float(2 ** (check_bits(bits, what="StatsQ weight") - 1))
  t, scale = statsq_pre_round(w, bits, reduce_axes)
  return scale * ((jnp.round(t) + 0.5) / n)


def _statsq_fwd(w, bits, reduce_axes):
  return statsq_quantize(w, bits, reduce_axes), None


def _statsq_bwd(bits, reduce_axes, _, g):
  del bits, reduce_axes
  return (g,)


statsq_quantize.defvjp(_statsq_fwd, _statsq_bwd)


def cga_frozen_mask(w: jax.Array, bits: int, boundary_range: float,
                    reduce_axes: tuple[int, ...] = (0,)) -> jax.Array:
  """CGA's frozen mask (spec 4.2): True where a weight is confidently on its level.

  A weight stays trainable only if its pre-round value ``t`` is within
  ``boundary_range`` (inclusive, in units of the step) of a rounding threshold
  ``i + 0.5`` for an integer ``i`` in ``[min(round t), max(round t) - 1]`` over
  the whole tensor; everything else, clipped weights included, is frozen.
  """
  t, _ = statsq_pre_round(w, bits, reduce_axes)
  levels = jnp.round(t)
  lo, hi = jnp.min(levels), jnp.max(levels)
  # Nearest threshold index below or at t: distance to i + 0.5 for i = floor(t - 0.5)
  # and i + 1 covers every threshold within 0.5 + BR < 1 of t.
  base = jnp.floor(t - 0.5)
  trainable = jnp.zeros(t.shape, dtype=bool)
  for offset in (0.0, 1.0):
    i = base + offset
    d = t - i
    in_band = (d <= 0.5 + boundary_range) & (d >= 0.5 - boundary_range)
    trainable |= in_band & (i >= lo) & (i <= hi - 1)
  return ~trainable
