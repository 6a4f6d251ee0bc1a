"""The oscillation tracker on hand-made level sequences (formulas of spec 4.5)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ofq_jax.quant.oscillation import init_oscillation, update_oscillation


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
