"""Swin parity, both tiers, against every public ``swin_*`` fixture (``../shared/fixtures``,
SWIN.md: outputs of the authors' PyTorch code, with its float64 results under ``f64/``).

Float64 tier (x64 on for this module, as ``test_parity_f64.py``): float and quantized
logits (1e-6 absolute) in both matmul modes, calibrated steps (1e-6 relative) and the
image sign, gradients (1e-6 relative per tensor); CGA masks exactly, on the targets the
reference's module-name test selects. Float32 tier: logits to 1e-5 and the export exact;
where float32 logits differ, every differing activation level must sit on a rounding tie
(the float64 run, equal to the reference's, decides it the other way) — the one case
two correct float32 implementations may disagree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ofq_jax.interop import export_ofq_torch, load_ofq_torch, load_torchvision_swin
from ofq_jax.interop.names import state_to_torch
from ofq_jax.models import calibrate, deit, quantizers, swin
from ofq_jax.models.rounded import cga_targets
from ofq_jax.quant import cga_frozen_mask, integer
from support.fixtures import x64_for_this_module  # noqa: F401  (autouse)
from support.fixtures import SWIN_FIXTURES, SwinFixture, array_group, check_parity

pytestmark = pytest.mark.x64

TOL = 1e-6
F32_ATOL = 1e-5
F64 = np.float64
ZERO_GRADIENT_SUFFIXES = ("attn.move_k_aft.bias", "attn.move_qkx_aft.bias")
_CACHE = {}


@pytest.fixture(params=SWIN_FIXTURES)
def fixture(request) -> SwinFixture:
  if request.param not in _CACHE:
    _CACHE[request.param] = SwinFixture(request.param)
  return _CACHE[request.param]


def _quantized(fixture, matmul="fake", dtype=F64):
  return load_ofq_torch(fixture.group("q"), fixture.config(matmul), dtype=dtype)


_forward = nnx.jit(lambda model, images, train: model(images, train=train), static_argnums=2)


def _abs_diff(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual) - expected)))


def test_float64_float_logits(fixture):
  model = load_torchvision_swin(fixture.group("fp"), fixture.config(), dtype=F64)
  logits = _forward(model, jnp.asarray(fixture.images("x_eval", F64)), False)
  assert np.asarray(logits).dtype == F64
  check_parity("f64", "swin float logits (abs)", fixture.name,
               _abs_diff(logits, fixture.arrays["f64/fp_logits"]), TOL)


def test_float64_quantized_logits(fixture, matmul, monkeypatch):
  """Eval and train logits; in 'integer' mode every quantized product runs on levels:
  per block v, W_qk, the logits, softmax.v, proj, fc1, fc2 (QKR) or qkv, q.k, softmax.v,
  proj, fc1, fc2, plus each reduction and the head (the patch embedding stays fake)."""
  calls = []
  for function in ("integer_dense", "integer_matmul"):
    real = getattr(integer, function)
    monkeypatch.setattr(integer, function,
                        lambda *a, real=real, f=function: calls.append(f) or real(*a))
  model = _quantized(fixture, matmul)
  images = jnp.asarray(fixture.images("x_eval", F64))
  for train, key in ((False, "f64/eval_logits"), (True, "f64/train_logits")):
    check_parity("f64", "swin quantized logits (abs)", f"{fixture.name}:{key}",
                 _abs_diff(_forward(model, images, train), fixture.arrays[key]), TOL)
  model_meta = fixture.meta["model"]
  per_block = 7 if fixture.meta["variant"] == "qkr" else 6
  expected = sum(model_meta["depths"]) * per_block + len(model_meta["depths"]) - 1 + 1
  assert len(calls) == (2 * expected if matmul == "integer" else 0), len(calls)


def test_float64_calibration(fixture):
  model = load_ofq_torch(fixture.group("precalib"), fixture.config(), calibrated=False,
                         dtype=F64)
  calibrate(model, jnp.asarray(fixture.images("x_calib", F64)))
  got = state_to_torch(nnx.state(model), swin.FAMILY.torch.reference)
  expected = array_group(fixture.arrays, "f64/qinit")
  steps = [k for k in expected if k.endswith(".s")]
  assert len(steps) > 10
  for key in steps:
    check_parity("f64", "swin calibrated steps (rel)", f"{fixture.name}:{key}",
                 float(np.max(np.abs(got[key] - expected[key]) / np.abs(expected[key]))), TOL)
  sign = "features.0.0.input_quant_fn.signed"
  np.testing.assert_array_equal(got[sign], expected[sign])


def test_float64_gradients(fixture):
  """Fake mode only: the integer mode's backward is the fake path's VJP by construction
  (``custom_vjp``), which the DeiT tier checks in both modes; here it would only double
  the suite's time."""
  matmul = "fake"
  images = jnp.asarray(fixture.images("x_eval", F64))
  upstream = fixture.arrays["g_logits"]
  loss = lambda model: jnp.sum(model(images, train=True) * upstream)
  grads = state_to_torch(nnx.jit(nnx.grad(loss))(_quantized(fixture, matmul)),
                         swin.FAMILY.torch.reference)
  expected = array_group(fixture.arrays, "f64/grad")
  assert set(expected) <= set(grads)
  assert all(not k.endswith(".s") or k in expected for k in grads)  # every step's gradient
  total = np.sqrt(sum(np.sum(g ** 2) for g in expected.values()))
  for key, ref in expected.items():
    where = f"{fixture.name}:{key}"
    if key.endswith(ZERO_GRADIENT_SUFFIXES):
      assert np.linalg.norm(ref) <= TOL * total, key
      check_parity("f64", "swin zero gradients (|g| / |all g|)", where,
                   float(np.linalg.norm(grads[key]) / total), TOL)
    else:
      rel = np.linalg.norm(grads[key] - ref) / max(np.linalg.norm(ref), 1e-300)
      check_parity("f64", "swin gradients (rel per tensor)", where, float(rel), TOL)


def test_cga_targets_and_masks(fixture):
  """The reference's module-name test, as ``swin.FAMILY.cga_targets`` (QKR) and nothing for
  the ``statsq`` Swin; masks of the q/ weights equal the reference's float64 masks."""
  model = _quantized(fixture)
  pattern = swin.FAMILY.cga_targets if fixture.meta["variant"] == "qkr" else deit.FAMILY.cga_targets
  targets = cga_targets(model, pattern)
  from ofq_jax.interop.names import renamed  # pylint: disable=import-outside-toplevel
  names = sorted(renamed(p, swin.FAMILY.torch.reference).replace(".v_kernel", ".v").replace(".kernel", "")
                 for p in targets)
  assert names == sorted(fixture.meta["cga_targets"])
  bits, boundary = fixture.meta["bits"], fixture.meta["cga_boundary_range"]
  weights = fixture.group("q")
  masks = array_group(fixture.arrays, "f64/cga_mask")
  assert len(masks) == len(targets)
  for key, expected in masks.items():
    frozen = np.asarray(cga_frozen_mask(jnp.asarray(weights[key].T, F64), bits, boundary)).T
    np.testing.assert_array_equal(frozen, expected == 1, err_msg=key)


def _levels_per_quantizer(fixture, dtype, monkeypatch):
  """Eval logits, and every activation quantizer's input, levels and unit in call order
  (returned from the compiled forward as extra outputs)."""
  real = quantizers.LsqQuantizer.__call__

  def forward(model, images):
    seen = []
    def record(self, x):
      seen.append((x, self.levels(x), self.unit(x.shape)))
      return real(self, x)
    with monkeypatch.context() as patch:
      patch.setattr(quantizers.LsqQuantizer, "__call__", record)
      return model(images, train=False), seen
  out, seen = nnx.jit(forward)(_quantized(fixture, dtype=dtype),
                               jnp.asarray(fixture.images("x_eval", dtype)))
  return np.asarray(out), [tuple(np.asarray(t) for t in entry) for entry in seen]


def test_float32_logits_or_a_rounding_tie(fixture, monkeypatch):
  with jax.enable_x64(False):
    logits, levels32 = _levels_per_quantizer(fixture, np.float32, monkeypatch)
  assert logits.dtype == np.float32
  diff = _abs_diff(logits, fixture.arrays["eval_logits"])
  if diff <= F32_ATOL:
    check_parity("f32", "swin quantized logits (abs)", fixture.name, diff, F32_ATOL)
    return
  _, levels64 = _levels_per_quantizer(fixture, F64, monkeypatch)
  # The first quantizer whose levels differ is where float32 and float64 part; every
  # entry flipped there must be a tie (later quantizers see the flip's consequences).
  first = next((i for i, (a, b) in enumerate(zip(levels32, levels64))
                if np.any(a[1] != b[1])), None)
  assert first is not None, f"float32 logits off by {diff:.3g} with no activation level flipped"
  _, l32, _ = levels32[first]
  x64, l64, unit = levels64[first]
  for index in map(tuple, np.argwhere(l32 != l64)):
    ratio = x64[index] / np.broadcast_to(unit, x64.shape)[index]
    assert abs(abs(ratio - np.floor(ratio)) - 0.5) < 1e-5, (first, index, ratio)  # a tie


def test_float32_export_round_trips(fixture):
  with jax.enable_x64(False):
    state = fixture.group("q")
    out = export_ofq_torch(_quantized(fixture, dtype=np.float32))
  assert set(out) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(out[key], value, err_msg=key)
