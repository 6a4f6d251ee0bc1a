"""Oscillation tracking of quantized weights in the integer domain (Nagel et al. 2022).

Per weight, the integer level ``k`` (e.g. ``statsq_levels``) is compared with the level
at the previous tracked step: a change is a flip with direction ``sign(k_prev - k)``
(the reference's ``TrackOscillation`` convention, spec 4.5); a flip whose direction
reverses the previous flip's is an oscillation. An EMA of oscillation events
(``momentum``, default 0.01) marks a weight as oscillating when it exceeds
``threshold`` (default 0.005). Pure functions over arrays, so the state can live in
any pytree; ``ofq_jax.models.tracker`` keeps it in NNX variables beside a model and
updates it inside the train step.
"""

from __future__ import annotations

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


def update_oscillation(state: OscillationState, levels: jax.Array, *,
                       momentum: float = 0.01, threshold: float = 0.005
                       ) -> tuple[OscillationState, dict[str, jax.Array]]:
  """One tracked step. Returns the new state and per-tensor statistics:
  ``flips`` (weights whose level changed), ``oscillations`` (flips reversing the
  previous flip), ``oscillating_fraction`` (share of weights with EMA > threshold)."""
  levels = jnp.asarray(levels, jnp.float32)
  delta = jnp.round(state.prev_level.astype(jnp.float32) - levels)
  direction = jnp.sign(delta)
  flipped = delta != 0
  prev_direction = state.prev_direction.astype(jnp.float32)
  oscillated = (prev_direction * direction) == -1
  ema = momentum * oscillated.astype(jnp.float32) + (1.0 - momentum) * state.ema
  new_state = OscillationState(
      levels.astype(state.prev_level.dtype),
      jnp.where(flipped, direction, prev_direction).astype(state.prev_direction.dtype), ema)
  stats = {"flips": jnp.sum(flipped), "oscillations": jnp.sum(oscillated),
           "oscillating_fraction": jnp.mean((ema > threshold).astype(jnp.float32))}
  return new_state, stats
