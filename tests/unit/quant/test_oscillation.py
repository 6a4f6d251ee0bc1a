"""The oscillation tracker on hand-made level sequences (formulas of spec 4.5), under
both flip definitions (integer level; fixed grid), checked against values worked out by
hand in each test's docstring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofq_jax.quant.oscillation import (init_fixed_grid, init_oscillation, oscillation_step,
                                       track_fixed_grid, update_oscillation)
from ofq_jax.quant.rounding import Rounding


def run(sequence, momentum=0.01, threshold=0.005):
  """Tracks a (steps, weights) sequence of levels; returns per-step stats and state."""
  sequence = np.asarray(sequence, np.float32)
  state = init_oscillation(sequence[0])
  history = []
  for levels in sequence[1:]:
    state, stats = update_oscillation(state, jnp.asarray(levels), momentum=momentum,
                                      threshold=threshold)
    history.append({k: float(v) for k, v in stats.items()})
  return history, state


def test_up_down_up_oscillates_but_up_up_does_not():
  # weight 0: 0 -> 1 -> 0 -> 1 (up, down, up); weight 1: 0 -> 1 -> 2 -> 2 (up, up, stay)
  history, state = run([[0, 0], [1, 1], [0, 2], [1, 2]])
  assert [h["flips"] for h in history] == [2, 2, 1]
  assert [h["oscillations"] for h in history] == [0, 1, 1]
  m = 0.01
  expected_ema = m * 1 + (1 - m) * (m * 1 + (1 - m) * 0)  # events at steps 2 and 3
  np.testing.assert_allclose(state.ema, [expected_ema, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(state.prev_direction, [-1, -1])  # k_prev - k < 0: moved up


def test_a_pause_keeps_the_last_direction():
  # up, stay, stay, down: the down flip still reverses the earlier up flip.
  history, _ = run([[0], [1], [1], [1], [0]])
  assert [h["oscillations"] for h in history] == [0, 0, 0, 1]


def test_ema_decay_and_oscillating_fraction():
  levels = [[0, 0, 0]] + [[i % 2, 0, 0] for i in range(1, 6)]  # weight 0 flips every step
  history, state = run(levels, momentum=0.1, threshold=0.15)
  # Oscillations from the 2nd flip on: EMA = 1 - 0.9^4 after 4 events.
  assert float(state.ema[0]) == pytest.approx(1 - 0.9 ** 4, rel=1e-6)
  assert history[-1]["oscillating_fraction"] == pytest.approx(1 / 3)
  assert history[0]["oscillating_fraction"] == 0.0


# ----------------------------------------------------------------------------- fixed grid
def statsq_on_grid(bits):
  """``(w, scale) -> level`` of StatsQ on a fixed grid, written out from spec 1.1."""
  n = 2 ** (bits - 1)
  return lambda w, s: jnp.round(jnp.clip(w / s, -1.0, 1.0 - 1e-6) * n - 0.5)


def run_both(weights, scales, refresh_every=100, momentum=0.5, bits=2):
  """Tracks one channel's ``(steps, weights)`` latent values with per-step ``scales``
  under both definitions; returns per-step flip counts of each."""
  on_grid = statsq_on_grid(bits)
  weights = jnp.asarray(weights, jnp.float32)
  integer = init_oscillation(on_grid(weights[0], scales[0]))
  grid = init_fixed_grid(weights[0], jnp.float32(scales[0]), on_grid)
  integer_flips, grid_flips = [], []
  for t in range(1, len(weights)):
    integer, flipped, _ = oscillation_step(integer, on_grid(weights[t], scales[t]),
                                           momentum=momentum)
    integer_flips.append(int(flipped.sum()))
    grid, flipped, _ = track_fixed_grid(grid, weights[t], jnp.float32(scales[t]), on_grid,
                                        refresh=t % refresh_every == 0, momentum=momentum)
    grid_flips.append(int(flipped.sum()))
  return integer_flips, grid_flips, integer, grid


def test_a_scale_change_under_a_still_weight_flips_only_the_integer_level():
  """w = 0.3 never moves; the scale goes 1.0 -> 0.5 -> 1.0 -> 0.5. At 2 bits the level
  is round(clip(w/s) * 2 - 0.5): 0.3/1.0 -> round(0.1) = 0, 0.3/0.5 -> round(0.7) = 1.
  The integer-level definition sees three flips and two oscillations; the fixed grid
  (frozen at s = 1.0) sees none."""
  integer_flips, grid_flips, integer, grid = run_both([[0.3]] * 4, [1.0, 0.5, 1.0, 0.5])
  assert integer_flips == [1, 1, 1] and grid_flips == [0, 0, 0]
  assert float(integer.ema[0]) == pytest.approx(0.5 * 1 + 0.5 * 0.5)  # events at 2 and 3
  assert float(grid.oscillation.ema[0]) == 0.0


def test_a_weight_crossing_a_threshold_flips_under_both_definitions():
  """Scale fixed at 1.0, w goes 0.45 -> 0.55 -> 0.45 -> 0.55 across the threshold 0.5
  (t = 2w - 0.5 = 0.5): both definitions count the same flips and oscillations."""
  weights = [[0.45], [0.55], [0.45], [0.55]]
  integer_flips, grid_flips, integer, grid = run_both(weights, [1.0] * 4)
  assert integer_flips == grid_flips == [1, 1, 1]
  np.testing.assert_array_equal(integer.ema, grid.oscillation.ema)
  np.testing.assert_array_equal(integer.prev_direction, grid.oscillation.prev_direction)


def test_a_grid_refresh_rereads_the_level_without_counting_it():
  """w = 0.3 still; the scale drops to 0.5 at step 1 and stays. The fixed grid (refresh
  every 2 steps) moves to 0.5 at step 2 and re-reads level 1 there: no flip counted,
  no history touched; afterwards the new grid's level is the reference."""
  _, grid_flips, _, grid = run_both([[0.3]] * 5, [1.0, 0.5, 0.5, 0.5, 0.5], refresh_every=2)
  assert grid_flips == [0, 0, 0, 0]
  assert float(grid.grid_scale) == 0.5
  assert int(grid.oscillation.prev_level[0]) == 1
  assert int(grid.oscillation.prev_direction[0]) == 0


def test_levels_on_the_current_grid_are_the_levels():
  """``Rounding.levels_on_grid(x, scale(x))`` is ``levels(x)`` exactly, StatsQ and LSQ."""
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 8)) * 0.1
  for rounding, step in ((Rounding("statsq", 2, (0,)), None),
                         (Rounding("statsq", 3, (1,)), None),
                         (Rounding("lsq", 4, (0,)), jnp.full((8,), 0.03))):
    np.testing.assert_array_equal(rounding.levels_on_grid(x, rounding.scale(x, step)),
                                  rounding.levels(x, step))
