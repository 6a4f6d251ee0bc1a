"""How one tensor is rounded: a small record that wraps statsq.py / lsq.py (no new maths).

A layer declares each tensor it rounds with a ``Rounding`` (``ofq_jax.models.rounded``);
its forward pass, the oscillation tracker, CGA's target discovery and the checkpoint
guards all read the same record, so "which axes share a scale" is written once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ofq_jax.quant.lsq import floored_step, lsq_levels, lsq_quantize, lsq_range
from ofq_jax.quant.shapes import keep_axes_shape, reduce_axes_for
from ofq_jax.quant.statsq import (statsq_levels, statsq_pre_round_at, statsq_quantize,
                                  statsq_scale)

METHODS = ("statsq", "lsq")


@dataclasses.dataclass(frozen=True)
class Rounding:
  """``method`` at ``bits``; ``reduce_axes`` are the axes that share one scale.

  StatsQ's scale is the statistic ``2 mean|w|`` over ``reduce_axes``; LSQ's is a
  learned step indexed by the other axes (its ``keep_axes``), passed as ``step``.
  """
  method: str
  bits: int
  reduce_axes: tuple[int, ...]
  signed: bool = True

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Rounding method {self.method!r} is not one of {METHODS}.")

  def keep_axes(self, ndim: int) -> tuple[int, ...]:
    """The axes that index the scale (LSQ's ``keep_axes``)."""
    reduce = {a % ndim for a in self.reduce_axes}
    return tuple(a for a in range(ndim) if a not in reduce)

  def _step(self, x: jax.Array, step: jax.Array | None) -> jax.Array:
    if step is None:
      raise ValueError("LSQ rounding needs its learned step.")
    return jnp.reshape(step, keep_axes_shape(x.shape, self.keep_axes(x.ndim)))

  def apply(self, x: jax.Array, step: jax.Array | None = None) -> jax.Array:
    """The fake-quantized tensor, with the method's straight-through gradient."""
    if self.method == "statsq":
      return statsq_quantize(x, self.bits, self.reduce_axes)
    return lsq_quantize(x, step, bits=self.bits, signed=self.signed,
                        keep_axes=self.keep_axes(x.ndim), batch_axis=None)

  def levels(self, x: jax.Array, step: jax.Array | None = None) -> jax.Array:
    """The integer level of every entry, as ``apply`` rounds it."""
    if self.method == "statsq":
      return statsq_levels(x, self.bits, self.reduce_axes)
    qn, qp = lsq_range(self.bits, self.signed)
    return lsq_levels(x, self._step(x, step), qn, qp)

  def levels_on_grid(self, x: jax.Array, scale: jax.Array) -> jax.Array:
    """The integer level of every entry on the grid of ``scale`` (a ``scale()`` vector,
    e.g. a snapshot): ``levels`` with the scale held fixed. ``levels_on_grid(x,
    scale(x, step))`` equals ``levels(x, step)``."""
    s = jnp.reshape(scale, keep_axes_shape(x.shape, self.keep_axes(x.ndim))).astype(x.dtype)
    if self.method == "statsq":
      return jnp.round(statsq_pre_round_at(x, s, self.bits))
    qn, qp = lsq_range(self.bits, self.signed)
    return lsq_levels(x, s, qn, qp)

  @property
  def level_range(self) -> tuple[int, int]:
    """The range of ``apply``'s integer form (``apply = unit * integer``): StatsQ's odd
    ``2k + 1`` within ``±(2**bits - 1)``; LSQ's ``[Qn, Qp]``."""
    if self.method == "statsq":
      return -(2 ** self.bits - 1), 2 ** self.bits - 1
    return lsq_range(self.bits, self.signed)

  def integers(self, x: jax.Array, step: jax.Array | None = None) -> jax.Array:
    """``apply(x) / unit(x)`` as floats: StatsQ's odd ``2k + 1``, LSQ's levels; from the
    same expressions as ``apply``, so that XLA computes the rounding once for both."""
    levels = self.levels(x, step)
    return 2.0 * levels + 1.0 if self.method == "statsq" else levels

  def unit(self, x: jax.Array, step: jax.Array | None = None) -> jax.Array:
    """``apply(x) / unit`` is an integer: StatsQ's ``2 mean|w| / 2**bits`` (mid-rise
    levels ``(k + 0.5) / n`` are the odd ``2k + 1`` over ``2n``), LSQ's floored step.
    Shaped to broadcast against ``x``."""
    if self.method == "statsq":
      return statsq_scale(x, self.reduce_axes) / (2.0 ** self.bits)
    return floored_step(self._step(x, step))

  def scale(self, x: jax.Array, step: jax.Array | None = None) -> jax.Array:
    """The per-channel scale, flattened: StatsQ's ``2 mean|w|`` or LSQ's floored step."""
    if self.method == "statsq":
      return jnp.reshape(statsq_scale(x, self.reduce_axes), (-1,))
    return jnp.reshape(floored_step(self._step(x, step)), (-1,))


def weight_rounding(method: str, bits: int, ndim: int, out_axis: int = -1) -> Rounding:
  """A kernel's rounding: one scale per output unit (all other axes reduced)."""
  return Rounding(method, bits, reduce_axes_for(ndim, (out_axis,)))
