"""Oscillation tracking of quantized weights in the integer domain (Nagel et al. 2022).

Per weight, the integer level ``k`` (e.g. ``statsq_levels``) is compared with the level
at the previous tracked step: a change is a flip with direction ``sign(k_prev - k)``
(the reference's ``TrackOscillation`` convention, spec 4.5); a flip whose direction
reverses the previous flip's is an oscillation. An EMA of oscillation events
(``momentum``, default 0.01) marks a weight as oscillating when it exceeds
``threshold`` (default 0.005). Pure functions over arrays, so the state can live in
any pytree; ``ofq_jax.models.tracker`` keeps it in NNX variables beside a model and
updates it inside the train step.

Two definitions of the level a weight is on, tracked side by side:

* **integer-level** (``k_t = round(t(w_t, s_t))``, today's and the reference's): the
  level under the current scale ``s_t``. For StatsQ ``s_t = 2 mean|w_t|`` moves with every
  weight of the channel, so a weight that did not move can still flip.
* **fixed-grid** (``g_t = round(t(w_t, s_{t0}))``): the level under a scale snapshot
  ``s_{t0}`` taken at the last grid refresh (every ``grid_every`` tracked steps). Only
  the latent weight moving across a threshold of that grid flips it; at a refresh the
  level is re-read under the new grid without counting a flip. ``track_fixed_grid``.

The difference of the two flip counts is what the scale's drift contributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class OscillationState(NamedTuple):
  """Per-weight tracker state."""
  prev_level: jax.Array  # integer level at the last tracked step
  prev_direction: jax.Array  # direction of the last flip: -1, 0 (none yet) or +1
  ema: jax.Array  # EMA of oscillation events (float32)


def init_oscillation(levels: jax.Array, dtype: jnp.dtype = jnp.int8) -> OscillationState:
  """Tracker state starting at ``levels`` (no flips seen yet).

  Levels and directions are stored as ``dtype``: int8 holds every level up to 8 bits
  at a quarter of float32's memory (the state is three arrays per weight).
  """
  levels = jnp.asarray(levels).astype(dtype)
  return OscillationState(levels, jnp.zeros_like(levels),
                          jnp.zeros(levels.shape, jnp.float32))


def oscillation_step(state: OscillationState, levels: jax.Array, *, momentum: float = 0.01,
                     count: jax.Array | bool = True
                     ) -> tuple[OscillationState, jax.Array, jax.Array]:
  """One tracked step, per weight: the new state, the ``flipped`` mask (level changed)
  and the ``oscillated`` mask (a flip reversing the previous flip).

  ``count=False`` re-reads the levels without counting anything (a fixed grid's
  refresh): the EMA, the last direction and the masks stay untouched.
  """
  levels = jnp.asarray(levels, jnp.float32)
  delta = jnp.round(state.prev_level.astype(jnp.float32) - levels)
  flipped = (delta != 0) & count
  direction = jnp.where(flipped, jnp.sign(delta), 0.0)
  prev_direction = state.prev_direction.astype(jnp.float32)
  oscillated = (prev_direction * direction) == -1
  decay = jnp.where(count, 1.0 - momentum, 1.0)
  ema = jnp.where(count, momentum, 0.0) * oscillated.astype(jnp.float32) + decay * state.ema
  new_state = OscillationState(
      levels.astype(state.prev_level.dtype),
      jnp.where(flipped, direction, prev_direction).astype(state.prev_direction.dtype), ema)
  return new_state, flipped, oscillated


def update_oscillation(state: OscillationState, levels: jax.Array, *,
                       momentum: float = 0.01, threshold: float = 0.005
                       ) -> tuple[OscillationState, dict[str, jax.Array]]:
  """One tracked step. Returns the new state and per-tensor statistics:
  ``flips`` (weights whose level changed), ``oscillations`` (flips reversing the
  previous flip), ``oscillating_fraction`` (share of weights with EMA > threshold)."""
  new_state, flipped, oscillated = oscillation_step(state, levels, momentum=momentum)
  stats = {"flips": jnp.sum(flipped), "oscillations": jnp.sum(oscillated),
           "oscillating_fraction": jnp.mean((new_state.ema > threshold).astype(jnp.float32))}
  return new_state, stats


class FixedGridState(NamedTuple):
  """Fixed-grid tracker state: the grid's scale snapshot and the oscillation state of
  the levels read on that grid."""
  grid_scale: jax.Array
  oscillation: OscillationState


LevelsOnGrid = Callable[[jax.Array, jax.Array], jax.Array]
"""``(weights, scale) -> integer levels`` of the weights on the grid of ``scale``."""


def init_fixed_grid(weights: jax.Array, scale: jax.Array, levels_on: LevelsOnGrid,
                    dtype: jnp.dtype = jnp.int8) -> FixedGridState:
  """Fixed-grid state with the grid frozen at ``scale`` (no flips seen yet)."""
  return FixedGridState(jnp.asarray(scale, jnp.float32),
                        init_oscillation(levels_on(weights, scale), dtype))


def track_fixed_grid(state: FixedGridState, weights: jax.Array, scale: jax.Array,
                     levels_on: LevelsOnGrid, *, refresh: jax.Array | bool,
                     momentum: float = 0.01
                     ) -> tuple[FixedGridState, jax.Array, jax.Array]:
  """One tracked step on the fixed grid: flips are threshold crossings of the latent
  ``weights`` on the grid of ``state.grid_scale``; when ``refresh`` the grid moves to
  the current ``scale`` and the levels are re-read there, uncounted. Returns the new
  state and the ``flipped`` / ``oscillated`` masks of ``oscillation_step``."""
  grid = jnp.where(refresh, jnp.asarray(scale, jnp.float32), state.grid_scale)
  oscillation, flipped, oscillated = oscillation_step(
      state.oscillation, levels_on(weights, grid.astype(weights.dtype)), momentum=momentum,
      count=jnp.logical_not(refresh))
  return FixedGridState(grid, oscillation), flipped, oscillated
