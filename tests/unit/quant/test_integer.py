"""Integer-domain matmul (ofq_jax.quant.integer) against float fake-quant and a float64
reference product: random sizes and bit-widths, the exact-accumulation bound, gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofq_jax.models.layers import Levels, WeightLevels, quantized_dense
from ofq_jax.quant import integer
from ofq_jax.quant.lsq import lsq_range
from ofq_jax.quant.rules import QuantSpec

EPS32 = float(np.finfo(np.float32).eps)


def _case(rng, depth: int, x_range, w_range):
  """Levels in the ranges, positive units per row / column, a move bias; the float32
  operands fake-quant multiplies (``x = unit * levels + shift``, ``w = unit * levels``)."""
  batch, tokens, out = int(rng.integers(1, 3)), int(rng.integers(1, 9)), int(rng.integers(1, 17))
  levels_x = rng.integers(x_range[0], x_range[1] + 1, size=(batch, tokens, depth))
  levels_w = rng.integers(w_range[0], w_range[1] + 1, size=(depth, out))
  if w_range[0] == -w_range[1]:  # StatsQ: odd levels only
    levels_w = levels_w | 1
  unit_x = rng.uniform(0.01, 1.0, size=(1, tokens, 1)).astype(np.float32)
  unit_w = rng.uniform(0.01, 1.0, size=(1, out)).astype(np.float32)
  shift = rng.normal(scale=0.1, size=(depth,)).astype(np.float32)
  quantized = (levels_x * unit_x).astype(np.float32)  # fl(k * s), as LSQ computes it
  x = quantized + shift
  w = (levels_w * unit_w).astype(np.float32)
  return x, w, quantized, unit_x, shift, unit_w


def _w_levels(w, unit_w):
  return integer.integer_levels(jnp.asarray(w), jnp.asarray(unit_w))


def _bits_ranges(rng):
  bits_x, bits_w = int(rng.integers(2, 9)), int(rng.integers(2, 9))
  x_range = lsq_range(bits_x, bool(rng.integers(0, 2)))
  w_range = ((-(2 ** bits_w - 1), 2 ** bits_w - 1) if rng.integers(0, 2)
             else lsq_range(bits_w, True))
  return x_range, w_range


@pytest.mark.parametrize("seed", range(12))
def test_integer_matmul_agrees_with_fake_to_float32_rounding(seed):
  """Both paths are within a few float32 ulps of the float64 product of the same operands
  (scaled by sum |x| |w|); the integer one is exact up to its three final roundings."""
  rng = np.random.default_rng(seed)
  x_range, w_range = _bits_ranges(rng)
  depth = int(rng.integers(1, 700))
  how = integer.plan(depth, x_range, w_range, operand="float32")
  assert how is not None  # these sizes are inside the bound
  x, w, quantized, unit_x, shift, unit_w = _case(rng, depth, x_range, w_range)
  levels = integer.integer_levels(jnp.asarray(quantized), jnp.asarray(unit_x))
  np.testing.assert_array_equal(levels, np.round(quantized / unit_x))
  got = integer.integer_dense(jnp.asarray(x), jnp.asarray(w), levels, jnp.asarray(unit_x),
                              jnp.asarray(shift), _w_levels(w, unit_w), jnp.asarray(unit_w), how)
  fake = jnp.matmul(jnp.asarray(x), jnp.asarray(w), precision="highest")
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
  for name, value in (("integer", got), ("fake", fake)):
    err = np.abs(np.asarray(value, np.float64) - exact)
    assert np.all(err <= 4 * EPS32 * scale + 1e-30), (name, float(np.max(err / scale)))


@pytest.mark.parametrize("operand", ["bfloat16", "int8"])
def test_narrow_operands_give_the_float32_operands_result(operand):
  """Small levels: bf16 and int8 operands (f32 / int32 sums) give bit-identical output."""
  rng = np.random.default_rng(5)
  x_range, w_range = (-2, 1), (-3, 3)
  x, w, quantized, unit_x, shift, unit_w = _case(rng, 300, x_range, w_range)
  args = (jnp.asarray(x), jnp.asarray(w),
          integer.integer_levels(jnp.asarray(quantized), jnp.asarray(unit_x)),
          jnp.asarray(unit_x), jnp.asarray(shift), _w_levels(w, unit_w), jnp.asarray(unit_w))
  wide = integer.integer_dense(*args, integer.plan(300, x_range, w_range, operand="float32"))
  narrow = integer.integer_dense(*args, integer.plan(300, x_range, w_range, operand=operand))
  np.testing.assert_array_equal(narrow, wide)


def test_the_exact_accumulation_bound():
  """float32 sums are exact to 2**24, int32 to 2**31 - 1; int8 holds [-128, 127], bf16
  [-256, 256]; past them there is no plan (the layer keeps fake-quant)."""
  two, lsq8 = (-3, 3), (-128, 127)
  assert integer.plan(2 ** 24 // 9, two, two, operand="float32").accumulator == "float32"
  assert integer.plan(2 ** 24 // 9 + 1, two, two, operand="float32") is None
  assert integer.plan(2 ** 24 // 9 + 1, two, two, operand="int8").accumulator == "int32"
  assert integer.plan((2 ** 31 - 1) // 9 + 1, two, two, operand="int8") is None
  assert integer.plan(10, lsq8, lsq8, operand="int8") is not None
  assert integer.plan(10, (0, 255), lsq8, operand="int8") is None  # unsigned 8-bit
  assert integer.plan(10, (0, 255), lsq8, operand="bfloat16").operand == "bfloat16"
  assert integer.plan(10, (-511, 511), lsq8, operand="bfloat16") is None
  # DeiT's largest products stay inside: fc2 of DeiT-B at 4 bits, the 8-bit heads.
  assert integer.plan(3072, (0, 15), (-15, 15)) is not None
  assert integer.plan(768, lsq8, lsq8) is not None
  assert integer.plan(10, two, two, dtype=jnp.float64).operand == "float64"
  assert integer.plan(10, two, two).operand == integer.default_operand(jax.default_backend())


def test_past_the_bound_the_layer_keeps_fake_quant():
  rng = np.random.default_rng(3)
  depth, x_range, w_range = 1100, (-128, 127), (-255, 255)  # 1100 * 128 * 255 > 2**24
  x, w, quantized, unit_x, shift, unit_w = _case(rng, depth, x_range, w_range)
  spec = QuantSpec(8, 8, matmul="integer", matmul_operands="float32")
  x_levels = Levels(integer.integer_levels(jnp.asarray(quantized), jnp.asarray(unit_x)),
                    jnp.asarray(unit_x), jnp.asarray(shift), x_range)
  out = quantized_dense(jnp.asarray(x), jnp.asarray(w), spec, x_levels,
                        WeightLevels(_w_levels(w, unit_w), jnp.asarray(unit_w), w_range))
  np.testing.assert_array_equal(out, jnp.matmul(x.reshape(-1, depth), w,
                                                precision="highest").reshape(out.shape))


@pytest.mark.parametrize("backward,tol", [("float32", 1e-6), ("bf16x3", 1e-5), ("bf16", 1e-2)])
def test_gradients_are_the_fake_paths(backward, tol):
  """The VJP is the fake matmul's (x and w only; the describing inputs get zeros), at the
  configured backward precision: float32 exact to rounding, bf16 (bfloat16 operands,
  float32 sums) within bf16's relative precision."""
  rng = np.random.default_rng(7)
  x_range, w_range = (-2, 1), (-3, 3)
  x, w, quantized, unit_x, shift, unit_w = _case(rng, 64, x_range, w_range)
  how = integer.plan(64, x_range, w_range, backward=backward)
  levels = integer.integer_levels(jnp.asarray(quantized), jnp.asarray(unit_x))
  cotangent = jnp.asarray(rng.normal(size=x.shape[:-1] + (w.shape[1],)), jnp.float32)
  _, vjp = jax.vjp(lambda *a: integer.integer_dense(*a, how), jnp.asarray(x), jnp.asarray(w),
                   levels, jnp.asarray(unit_x), jnp.asarray(shift), _w_levels(w, unit_w),
                   jnp.asarray(unit_w))
  dx, dw, *rest = vjp(cotangent)
  _, fake_vjp = jax.vjp(lambda a, b: jnp.matmul(a, b, precision="highest"), jnp.asarray(x),
                        jnp.asarray(w))
  fdx, fdw = fake_vjp(cotangent)
  for got, want in ((dx, fdx), (dw, fdw)):  # relative error of the whole gradient
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) <= tol
  assert all(float(jnp.max(jnp.abs(r))) == 0.0 for r in rest)


@pytest.mark.parametrize("seed", [0, 1])
def test_levels_read_in_their_stored_layout(seed):
  """``_levels_product`` with permuted operands equals ``jnp.matmul`` of the transposed
  levels (an independent formulation), exactly: integer sums in float32. Covers a batch
  axis that is not leading in storage (softmax @ v's values) and broadcast batch axes
  (the fallback)."""
  rng = np.random.default_rng(seed)
  how = integer.plan(32, (-8, 7), (-8, 7), operand="bfloat16")
  ints = lambda *shape: jnp.asarray(rng.integers(-8, 8, size=shape), jnp.float32)
  a = ints(3, 2, 5, 32)                  # (B, H, M, K) as stored
  b = ints(3, 32, 2, 6)                  # (B, K, H, N): logical (B, H, K, N) via (0, 2, 1, 3)
  want = jnp.matmul(a, jnp.transpose(b, (0, 2, 1, 3)), precision="highest")
  got = integer._levels_product(a, b, (None, (0, 2, 1, 3)), how)
  np.testing.assert_array_equal(got, want)
  b_nk = ints(3, 2, 6, 32)               # (B, H, N, K): logical (B, H, K, N) via (0, 1, 3, 2)
  got = integer._levels_product(a, b_nk, (None, (0, 1, 3, 2)), how)
  np.testing.assert_array_equal(got, jnp.matmul(a, jnp.swapaxes(b_nk, 2, 3),
                                                precision="highest"))
  shared = ints(1, 2, 32, 6)             # one batch entry broadcast over B
  got = integer._levels_product(a, shared, (None, None), how)
  np.testing.assert_array_equal(got, jnp.matmul(a, shared, precision="highest"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's operand upcaster")
def test_a_permuted_operand_keeps_the_bf16_dot_on_cpu():
  """The reason for stored layouts: XLA:CPU upcast a bf16 dot fed a transposed copy to
  float32 (the product then ran at the float32 rate). Every dot of the compiled integer
  softmax @ v (values stored token-major, as the attention makes them) has bf16 operands."""
  how = integer.plan(64, (0, 3), (-2, 1), operand="bfloat16")
  probs = jnp.round(jax.random.uniform(jax.random.key(0), (2, 3, 16, 16)) * 3)
  values = jnp.round(jax.random.normal(jax.random.key(1), (2, 16, 3, 8))).clip(-2, 1)
  unit_p, unit_v = jnp.full((2, 3, 16, 1), 0.3), jnp.full((1, 3, 1, 8), 0.2)
  def attend(p, v):
    logical = jnp.transpose(v, (0, 2, 1, 3))
    return integer.integer_matmul(p * unit_p, logical * unit_v, p, unit_p, None, v, unit_v,
                                  None, how, (None, (0, 2, 1, 3)))
  text = jax.jit(attend).lower(probs, values).compile().as_text()
  shapes = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", text)}
  dots = re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", text)
  assert dots, text
  assert all(shapes[x] == shapes[y] == "bf16" for x, y in dots), dots
  np.testing.assert_allclose(attend(probs, values),
                             jnp.matmul(probs * unit_p, jnp.transpose(values, (0, 2, 1, 3))
                                        * unit_v, precision="highest"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("attention", ["qkr", "standard"])
@pytest.mark.parametrize("operands", ["auto", "bfloat16"])
def test_which_attention_products_run_on_levels(attention, operands, monkeypatch):
  """Counted as a float32 forward is traced: both attention products (the logits and
  ``softmax @ v``) run on levels, under ``auto`` as with a named operand dtype, and the
  model's output agrees with the fake mode's."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ofq_jax.models import calibrate, create_model, model_config  # pylint: disable=import-outside-toplevel
  depth = 2
  def build(matmul):
    config = model_config(None, embed_dim=64, depth=depth, num_heads=2, patch_size=8,
                          img_size=32, num_classes=5,
                          quant=dict(enabled=True, attention=attention, weight_bits=4,
                                     act_bits=4, matmul=matmul, matmul_operands=operands))
    return create_model(config, 0)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  fake = build("fake")
  calibrate(fake, images)
  model = build("integer")
  nnx.update(model, nnx.state(fake))
  calls = []
  real = integer.integer_matmul
  monkeypatch.setattr(integer, "integer_matmul",
                      lambda *a: calls.append(a[8].operand) or real(*a))
  got = model(images, train=False)
  assert len(calls) == 2 * depth, calls
  np.testing.assert_allclose(got, fake(images, train=False), atol=2e-5, rtol=0)
