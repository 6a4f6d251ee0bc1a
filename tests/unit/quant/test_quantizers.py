"""StatsQ, LSQ and the CGA mask against formulas derived by hand (spec 1, 2, 4.2).

Parity with the authors' code (``../shared/fixtures/quantizers_*.npz``) is in
``test_parity_f32.py`` and ``test_parity_f64.py``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofq_jax.quant import (cga_frozen_mask, lsq_quantize, lsq_range,
                           shared_count, statsq_levels, statsq_quantize)

BITS = (2, 3, 4, 8)
TOL = 1e-5


def test_statsq_worked_two_bit_example():
  """Spec 1.2 by hand: s = 0.46, levels (k + 0.5)/2 with k = [0,-2,0,1,-1,0,-2,0]."""
  row = jnp.array([0.10, -0.30, 0.05, 0.45, -0.02, 0.20, -0.60, 0.12], jnp.float32)
  kernel = row[:, None]  # (in=8, out=1): one output unit
  q = statsq_quantize(kernel, 2, (0,))[:, 0]
  expected = 0.46 * np.array([0.25, -0.75, 0.25, 0.75, -0.25, 0.25, -0.75, 0.25])
  np.testing.assert_allclose(q, expected, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(statsq_levels(kernel, 2, (0,))[:, 0], [0, -2, 0, 1, -1, 0, -2, 0])
  # Identity gradient everywhere, the clipped -0.60 included; nothing reaches the scale.
  grad = jax.grad(lambda k: jnp.sum(statsq_quantize(k, 2, (0,)) * jnp.arange(8.0)[:, None]))(
      kernel)
  np.testing.assert_array_equal(grad[:, 0], np.arange(8.0))


@pytest.mark.parametrize("bits", BITS)
def test_statsq_levels_and_zero_quirk(bits):
  """Exactly 2^b levels, all mid-rise; an exact zero maps to +delta/2 (spec item 7.20)."""
  kernel = jax.random.normal(jax.random.key(bits), (4096, 3)).at[0, 0].set(0.0)
  q = np.asarray(statsq_quantize(kernel, bits, (0,)))
  scale = 2 * np.mean(np.abs(np.asarray(kernel)), axis=0)
  n = 2 ** (bits - 1)
  levels = np.round(q / scale * n - 0.5)
  assert levels.min() == -n and levels.max() == n - 1
  assert len(np.unique(levels[:, 0])) == 2 ** bits
  assert q[0, 0] == pytest.approx(scale[0] / (2 * n), rel=1e-5)


def test_statsq_scale_axes_for_other_layouts():
  """reduce_axes picks the axes of one scale: (H, D, D) per (head, row) over the last."""
  w = jax.random.normal(jax.random.key(0), (3, 5, 7))
  q = statsq_quantize(w, 2, (2,))
  s = 2 * jnp.mean(jnp.abs(w), axis=2, keepdims=True)
  k = jnp.round(jnp.clip(w / s, -1, 1 - 1e-6) * 2 - 0.5)
  np.testing.assert_allclose(q, s * (k + 0.5) / 2, rtol=1e-6)


def test_lsq_ranges():
  assert lsq_range(2, True) == (-2, 1) and lsq_range(2, False) == (0, 3)
  assert lsq_range(3, True) == (-4, 3) and lsq_range(4, False) == (0, 15)
  assert lsq_range(8, True) == (-128, 127)


def test_lsq_gradients_inside_at_and_beyond_the_clip_range():
  """Hand formulas: dx = 1 on [Qn, Qp] (bounds included, like torch.clamp) and 0 outside;
  ds = g*(round(v) - v) inside, g*Qn below, g*Qp above, g = 1/sqrt(Qp*M)."""
  step = jnp.array([0.5])
  # 2-bit signed: Qn=-2, Qp=1. v = x / 0.5.
  x = jnp.array([[-1.6, -1.0, -0.3, 0.2, 0.5, 0.9]])  # v = -3.2, -2 (bound), -.6, .4, 1 (bound), 1.8
  y, vjp = jax.vjp(lambda x, s: lsq_quantize(x, s, bits=2, signed=True, keep_axes=()), x, step)
  np.testing.assert_allclose(y, [[-1.0, -1.0, -0.5, 0.0, 0.5, 0.5]], atol=1e-7)
  gx, gs = vjp(jnp.ones_like(x))
  np.testing.assert_array_equal(gx, [[0, 1, 1, 1, 1, 0]])
  v = np.array([-3.2, -2.0, -0.6, 0.4, 1.0, 1.8])
  per_entry = np.array([-2.0, np.round(v[1]) - v[1], np.round(v[2]) - v[2],
                        np.round(v[3]) - v[3], np.round(v[4]) - v[4], 1.0])
  g = 1 / math.sqrt(1 * 6)
  np.testing.assert_allclose(gs, [per_entry.sum() * g], rtol=1e-6)


def test_lsq_step_floor_is_value_only():
  """A step below 1e-5 quantizes with 1e-5 but still gets its gradient (identity clip)."""
  x = jnp.array([[3e-5, -2e-5]])
  tiny = jnp.array([1e-7])
  y, vjp = jax.vjp(lambda s: lsq_quantize(x, s, bits=4, signed=True, keep_axes=()), tiny)
  np.testing.assert_allclose(y, [[3e-5, -2e-5]], rtol=1e-5)
  (gs,) = vjp(jnp.ones_like(x))
  # v = 3, -2 are exact levels inside the range: round(v) - v = 0 for both.
  assert gs.shape == (1,)
  x2 = jnp.array([[1e-3]])  # v = 100 > Qp = 7: ds = Qp * g
  (gs2,) = jax.vjp(lambda s: lsq_quantize(x2, s, bits=4, signed=True, keep_axes=()), tiny)[1](
      jnp.ones_like(x2))
  np.testing.assert_allclose(gs2, [7 / math.sqrt(7 * 1)], rtol=1e-6)


def test_lsq_grad_batch_override_rescales_step_gradient():
  """M uses lsq_grad_batch in place of the batch axis: gs scales by sqrt(B / B_override)."""
  x = jax.random.normal(jax.random.key(1), (8, 5, 6))
  step = jnp.full((5,), 0.3)

  def grad(grad_batch):
    f = lambda s: jnp.sum(lsq_quantize(x, s, bits=3, signed=True, keep_axes=(1,),
                                       grad_batch=grad_batch, batch_axis=0) ** 2)
    return jax.grad(f)(step)

  np.testing.assert_allclose(grad(2), grad(None) * math.sqrt(8 / 2), rtol=1e-5)
  assert shared_count((8, 5, 6), (1,)) == 48
  assert shared_count((8, 5, 6), (1,), grad_batch=140, batch_axis=0) == 140 * 6


def test_lsq_step_shape_mismatch_is_explained():
  with pytest.raises(ValueError, match="needs \\(5,\\)"):
    lsq_quantize(jnp.ones((2, 5, 3)), jnp.ones((4,)), bits=2, signed=True, keep_axes=(1,))


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5])
def test_unsupported_bit_width(bits):
  with pytest.raises(ValueError, match="bit-width"):
    statsq_quantize(jnp.ones((4, 4)), bits, (0,))
  with pytest.raises(ValueError, match="bit-width"):
    lsq_range(bits, True)


def test_cga_mask_by_hand():
  """Spec 1.2's row: every entry is further than 0.005 from a threshold -> all frozen;
  a weight placed exactly on a threshold stays trainable."""
  row = np.array([0.10, -0.30, 0.05, 0.45, -0.02, 0.20, -0.60, 0.12], np.float32)
  assert bool(np.all(cga_frozen_mask(jnp.asarray(row[:, None]), 2, 0.005)))
  # Threshold at u = 0 (t = -0.5, between levels -1 and 0): a pair of +-eps weights.
  row2 = np.array([1.0, -1.0, 1e-4, -1e-4, 0.5, -0.5], np.float32)
  frozen = np.asarray(cga_frozen_mask(jnp.asarray(row2[:, None]), 2, 0.005))[:, 0]
  assert not frozen[2] and not frozen[3]
  assert frozen[0] and frozen[1]
