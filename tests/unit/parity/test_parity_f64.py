"""Float64 parity tier: everything, against the reference's float64 results (``f64/``).

Every fixture file in ``../shared/fixtures`` carries the authors' PyTorch code's
results computed in float64 on the same float32 states and inputs (fixtures
README). Here ofq_jax runs in float64 end to end (``jax.enable_x64``; the
float32 states and inputs cast exactly) and must agree to 1e-6: logits
absolute, calibrated steps relative per entry, gradients relative per tensor
(the two key-side biases whose true gradient is zero against 1e-6 of the whole
gradient's norm), CGA masks exactly. No rounding tie can flip a decision at
float64 precision, so a difference here is a bug.

x64 is switched on for this module only, inside a fixture that also clears
JAX's caches on both sides; every other test asserts that it is off
(``conftest._float32_unless_marked_x64``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ofq_jax import export
from ofq_jax.interop import (export_ofq_torch, load_ofq_torch, load_timm_deit,
                             quantize_from_float)
from ofq_jax.interop.names import state_to_torch
from ofq_jax.models import calibrate, create_model, deit, model_config
from ofq_jax.models.dtypes import cast_floating
from ofq_jax.quant import integer
from ofq_jax.quant import (cga_frozen_mask, lsq_initial_step, lsq_quantize, lsq_range,
                           statsq_quantize)
from support.fixtures import x64_for_this_module  # noqa: F401  (autouse)
from support.fixtures import DEIT_FIXTURES, DeitFixture, array_group, check_parity
from support.parity_cases import cga_cases, lsq_cases, statsq_bits

pytestmark = pytest.mark.x64

TOL = 1e-6
REFERENCE_NAMES = deit.FAMILY.torch.reference
F64 = np.float64
# A bias added to every key of a query row shifts that softmax row by a constant: the
# true gradient is exactly zero and both sides hold rounding noise.
ZERO_GRADIENT_SUFFIXES = ("attn.move_k_aft.bias", "attn.move_qkx_aft.bias")


def _abs_diff(actual, expected) -> float:
  actual = np.asarray(actual)
  assert actual.dtype == F64 and actual.shape == expected.shape, (actual.dtype, actual.shape)
  return float(np.max(np.abs(actual - expected)))


def _rel_error(actual, expected) -> float:
  """|a - e| / |e| over the whole tensor (the per-tensor gradient measure)."""
  actual = np.asarray(actual)
  assert actual.dtype == F64 and actual.shape == expected.shape, (actual.dtype, actual.shape)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def _check(quantity: str, where: str, value: float, tol: float = TOL) -> None:
  check_parity("f64", quantity, where, value, tol)


def _quantized(deit_fixture, matmul="fake"):
  return load_ofq_torch(deit_fixture.group("q"), deit_fixture.config(matmul), dtype=F64)


def _train_loss(deit_fixture):
  images = jnp.asarray(deit_fixture.images("x_eval", F64))
  z = deit_fixture.arrays

  def loss(model):
    cls_logits, dist_logits = model(images, train=True)
    return jnp.sum(cls_logits * z["g_cls"]) + jnp.sum(dist_logits * z["g_dist"])
  return loss


def test_float_model(deit_fixture):
  model = load_timm_deit(deit_fixture.group("fp"), deit_fixture.config(), dtype=F64)
  logits = model(jnp.asarray(deit_fixture.images("x_eval", F64)), train=False)
  _check("float logits (abs)", deit_fixture.name,
         _abs_diff(logits, deit_fixture.arrays["f64/fp_logits"]))


def test_calibration(deit_fixture, matmul):
  """precalib/ + x_calib, calibrated in float64 -> every f64/qinit/ step and the sign."""
  model = load_ofq_torch(deit_fixture.group("precalib"), deit_fixture.config(matmul),
                         calibrated=False, dtype=F64)
  calibrate(model, jnp.asarray(deit_fixture.images("x_calib", F64)))
  got = state_to_torch(nnx.state(model), REFERENCE_NAMES)
  expected = array_group(deit_fixture.arrays, "f64/qinit")
  steps = [k for k in expected if k.endswith(".s")]
  assert len(steps) > 10
  for key in steps:
    assert got[key].dtype == F64, key
    _check("calibrated steps (rel)", f"{deit_fixture.name}:{key}",
           float(np.max(np.abs(got[key] - expected[key]) / np.abs(expected[key]))))
  sign = "patch_embed.proj.input_quant_fn.signed"
  np.testing.assert_array_equal(got[sign], expected[sign])


def test_outputs(deit_fixture, matmul, monkeypatch):
  """Logits in both matmul modes; in 'integer' mode every quantized product of the blocks
  (dense layers and attention products) and of the 8-bit heads does run on integer levels
  (counted as the forward is traced)."""
  model = _quantized(deit_fixture, matmul)
  images = jnp.asarray(deit_fixture.images("x_eval", F64))
  z = deit_fixture.arrays
  name = deit_fixture.name
  calls = []
  for function in ("integer_dense", "integer_matmul"):
    real = getattr(integer, function)
    monkeypatch.setattr(integer, function,
                        lambda *a, real=real, f=function: calls.append(f) or real(*a))
  _check("quantized logits (abs)", f"{name}:eval",
         _abs_diff(model(images, train=False), z["f64/eval_logits"]))
  meta = deit_fixture.meta
  # Per block: v and W_qk (QKR) or qkv, proj, fc1, fc2, and the two attention products
  # (q.k or QKR's logits, softmax.v); then the heads. The patch embedding keeps
  # fake-quant (its per-pixel steps sit on the contracted axis).
  per_block = (5 if meta["variant"] == "qkr" else 4) + 2
  expected = meta["depth"] * per_block + (2 if meta["distilled"] else 1)
  assert len(calls) == (expected if matmul == "integer" else 0), calls
  cls_logits, dist_logits = model(images, train=True)
  _check("quantized logits (abs)", f"{name}:train_cls", _abs_diff(cls_logits, z["f64/train_cls"]))
  _check("quantized logits (abs)", f"{name}:train_dist",
         _abs_diff(dist_logits, z["f64/train_dist"]))


def test_gradients(deit_fixture, matmul):
  """grad of sum(train_cls*g_cls) + sum(train_dist*g_dist) w.r.t. every parameter."""
  gradient = nnx.jit(nnx.grad(_train_loss(deit_fixture)))
  grads = state_to_torch(gradient(_quantized(deit_fixture, matmul)), REFERENCE_NAMES)
  expected = array_group(deit_fixture.arrays, "f64/grad")
  assert set(grads) == set(expected)
  total = np.sqrt(sum(np.sum(g ** 2) for g in expected.values()))
  for key, ref in expected.items():
    where = f"{deit_fixture.name}:{key}"
    assert grads[key].dtype == F64, key
    if key.endswith(ZERO_GRADIENT_SUFFIXES):
      assert np.linalg.norm(ref) <= TOL * total, key
      _check("zero gradients (|g| / |all g|)", where, float(np.linalg.norm(grads[key]) / total))
    else:
      _check("gradients (rel per tensor)", where, _rel_error(grads[key], ref))


def test_cga_masks(deit_fixture):
  """Frozen mask of every CGA target weight (the q/ weights, BR from the json)."""
  bits, boundary = deit_fixture.meta["bits"], deit_fixture.meta["cga_boundary_range"]
  weights = deit_fixture.group("q")
  masks = array_group(deit_fixture.arrays, "f64/cga_mask")
  assert masks
  for key, expected in masks.items():
    frozen = np.asarray(cga_frozen_mask(jnp.asarray(weights[key].T, F64), bits, boundary)).T
    np.testing.assert_array_equal(frozen, expected == 1, err_msg=key)


def test_export_keeps_float64(deit_fixture):
  """A float64 model exports float64 reference tensors equal to what it loaded."""
  state = deit_fixture.group("q")
  out = export_ofq_torch(_quantized(deit_fixture))
  assert set(out) == set(state)
  for key, value in state.items():
    assert out[key].dtype == F64, key
    np.testing.assert_array_equal(out[key], value.astype(F64), err_msg=key)


def test_packed_export(deit_fixture, tmp_path):
  """The packed integer file of the fixture's model, loaded and run in float64 (its
  float32 units cast), gives the reference's float64 eval logits: in float32 the packed
  and fake-quant forwards each flip a few 2-bit ties (a random DeiT-T W2A2 at 224 px:
  2 of 64 images differ between them, 7-8 from float64), in float64 none."""
  path = tmp_path / "model.safetensors"
  export.export_integer(_quantized(deit_fixture), path)
  model = cast_floating(export.load_integer_model(path, deit_fixture.config()), F64)
  logits = model(jnp.asarray(deit_fixture.images("x_eval", F64)), train=False)
  _check("packed logits (abs)", f"{deit_fixture.name}:eval",
         _abs_diff(logits, deit_fixture.arrays["f64/eval_logits"]))


def test_loaders_keep_a_float64_state():
  """Under x64, dtype=None keeps a float64 checkpoint's precision (float32 stays float32)
  and builds a new model in float32 alone (flax's initializers alone would make float64
  kernels beside float32 norms)."""
  fixture = DeitFixture(DEIT_FIXTURES[0])
  state = fixture.group("q")
  for source, expected in ((np.float64, F64), (np.float32, np.float32)):
    model = load_ofq_torch({k: v.astype(source) for k, v in state.items()}, fixture.config())
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {np.dtype(expected)}
  for dtype, expected in ((None, np.float32), (F64, F64)):  # new models: one dtype, x64 or not
    for quant in (False, True):
      model = create_model(model_config("tiny", img_size=32, depth=1, quant=dict(enabled=quant)),
                           0, dtype=dtype)
      assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {np.dtype(expected)}
  float_model = load_timm_deit(fixture.group("fp"), fixture.config(), dtype=F64)
  quantized = quantize_from_float(float_model, fixture.config())
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(quantized))} == {np.dtype(F64)}


def test_eager_equals_jit(deit_fixture, matmul):
  """In float64 the op-by-op and the compiled forward agree to 1e-9 (eval and train)."""
  model = _quantized(deit_fixture, matmul)
  images = jnp.asarray(deit_fixture.images("x_eval", F64))
  jitted = nnx.jit(lambda m, x, train: m(x, train=train), static_argnums=2)
  with jax.disable_jit():
    eager_eval = model(images, train=False)
    eager_train = model(images, train=True)
  name = deit_fixture.name
  _check("eager vs jit logits (abs)", name,
         _abs_diff(jitted(model, images, False), np.asarray(eager_eval)), 1e-9)
  for a, b in zip(jitted(model, images, True), eager_train):
    _check("eager vs jit logits (abs)", name, _abs_diff(a, np.asarray(b)), 1e-9)


def test_statsq(quantizer_fixture):
  """Values and the identity straight-through gradient (torch (out, in) = kernel.T)."""
  z = quantizer_fixture
  for bits in statsq_bits(z):
    kernel = jnp.asarray(z[f"statsq/b{bits}/w"].T, F64)
    q, vjp = jax.vjp(lambda k, b=bits: statsq_quantize(k, b, (0,)), kernel)
    (grad,) = vjp(jnp.asarray(z[f"statsq/b{bits}/gy"].T, F64))
    where = f"{quantizer_fixture.name}:statsq/b{bits}"
    _check("quantizer outputs (rel to max)", where,
           _abs_diff(q.T, z[f"f64/statsq/b{bits}/q"]) / float(np.max(np.abs(q))))
    _check("quantizer gradients (rel)", where, _rel_error(grad.T, z[f"f64/statsq/b{bits}/gw"]))


def test_lsq(quantizer_fixture):
  """Float64 init; output and both gradients at the float32 s0 (as ``f64/`` was made)."""
  z = quantizer_fixture
  for case in lsq_cases(z):
    p = case.prefix
    x = jnp.asarray(z[p + "x"], F64)
    _, qp = lsq_range(case.bits, case.signed)
    step0 = lsq_initial_step(x, qp=qp, keep_axes=case.keep_axes, factor=case.init_factor)
    expected_s0 = z["f64/" + p + "s0"]
    where = f"{quantizer_fixture.name}:{p}"
    assert step0.dtype == F64
    _check("quantizer init steps (rel)", where,
           float(np.max(np.abs(np.asarray(step0) - expected_s0) / expected_s0)))

    def f(x, s, case=case):
      return lsq_quantize(x, s, bits=case.bits, signed=case.signed, keep_axes=case.keep_axes)

    y, vjp = jax.vjp(f, x, jnp.asarray(z[p + "s0"], F64))
    gx, gs = vjp(jnp.asarray(z[p + "gy"], F64))
    _check("quantizer outputs (rel to max)", where,
           _abs_diff(y, z["f64/" + p + "y"]) / float(np.max(np.abs(y))))
    _check("quantizer gradients (rel)", where, _rel_error(gx, z["f64/" + p + "gx"]))
    _check("quantizer gradients (rel)", where, _rel_error(gs, z["f64/" + p + "gs"]))


def test_cga_mask(quantizer_fixture):
  z = quantizer_fixture
  cases = cga_cases(z)
  assert cases
  for prefix, bits, boundary in cases:
    frozen = np.asarray(cga_frozen_mask(jnp.asarray(z[prefix + "w"].T, F64), bits, boundary)).T
    np.testing.assert_array_equal(frozen, z[f"f64/{prefix}frozen"] == 1, err_msg=prefix)
