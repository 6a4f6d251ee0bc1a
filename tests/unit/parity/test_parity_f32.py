"""Float32 parity tier: what a rounding tie cannot flip, against the fixtures' float32 arrays.

Every expected value comes from ``../shared/fixtures`` (outputs of the authors'
PyTorch code, see its README); every ``deit_*`` and ``quantizers_*`` file found
there is tested. In float32 a quantizer decision a few ulps from a rounding
threshold or a clip bound can go either way between two correct
implementations, so this tier checks only logits (1e-5 absolute), quantizer
outputs (1e-5 of their largest value), the export (exact) and the float
model; calibrated steps, gradients and CGA masks are judged in the float64
tier (``test_parity_f64.py``), where a tie cannot hide a bug.
"""

import jax.numpy as jnp
import numpy as np

from ofq_jax.interop import export_ofq_torch, export_timm_deit, load_ofq_torch, load_timm_deit
from ofq_jax.quant import lsq_initial_step, lsq_quantize, lsq_range, statsq_quantize
from support.fixtures import check_parity, max_rel_diff
from support.parity_cases import lsq_cases, statsq_bits

ATOL = 1e-5


def _check_logits(quantity: str, where: str, actual, expected) -> None:
  actual = np.asarray(actual)
  assert actual.dtype == np.float32 and actual.shape == expected.shape
  check_parity("f32", quantity, where, float(np.max(np.abs(actual - expected))), ATOL)


def test_float_model_reproduces_fp_logits(deit_fixture):
  model = load_timm_deit(deit_fixture.group("fp"), deit_fixture.config())
  logits = model(jnp.asarray(deit_fixture.images("x_eval")), train=False)
  _check_logits("float logits (abs)", deit_fixture.name, logits, deit_fixture.arrays["fp_logits"])


def test_quantized_outputs_match(deit_fixture, matmul):
  model = load_ofq_torch(deit_fixture.group("q"), deit_fixture.config(matmul))
  images = jnp.asarray(deit_fixture.images("x_eval"))
  z, name = deit_fixture.arrays, deit_fixture.name
  _check_logits("quantized logits (abs)", f"{name}:eval", model(images, train=False),
                z["eval_logits"])
  cls_logits, dist_logits = model(images, train=True)
  _check_logits("quantized logits (abs)", f"{name}:train_cls", cls_logits, z["train_cls"])
  _check_logits("quantized logits (abs)", f"{name}:train_dist", dist_logits, z["train_dist"])


def test_export_round_trips_exactly(deit_fixture):
  """load -> export gives back the reference's state dicts bit for bit (q/ and fp/)."""
  for group, load, export in (("q", load_ofq_torch, export_ofq_torch),
                              ("fp", load_timm_deit, export_timm_deit)):
    state = deit_fixture.group(group)
    out = export(load(state, deit_fixture.config()))
    assert set(out) == set(state), group
    for key, value in state.items():
      assert out[key].dtype == np.float32, key
      np.testing.assert_array_equal(out[key], value, err_msg=key)


def test_statsq_outputs_match(quantizer_fixture):
  """StatsQ values (torch (out, in) = Flax kernel.T); the identity STE in the f64 tier."""
  z = quantizer_fixture
  for bits in statsq_bits(z):
    q = statsq_quantize(jnp.asarray(z[f"statsq/b{bits}/w"].T), bits, (0,))
    check_parity("f32", "quantizer outputs (rel to max)", f"{z.name}:statsq/b{bits}",
                 max_rel_diff(q.T, z[f"statsq/b{bits}/q"]), ATOL)


def test_lsq_init_and_outputs_match(quantizer_fixture):
  """LSQ's data-dependent init and its output at the reference's own s0."""
  z = quantizer_fixture
  for case in lsq_cases(z):
    x = jnp.asarray(z[case.prefix + "x"])
    _, qp = lsq_range(case.bits, case.signed)
    step0 = lsq_initial_step(x, qp=qp, keep_axes=case.keep_axes, factor=case.init_factor)
    where = f"{z.name}:{case.prefix}"
    check_parity("f32", "quantizer init steps (rel to max)", where,
                 max_rel_diff(step0, z[case.prefix + "s0"]), ATOL)
    y = lsq_quantize(x, jnp.asarray(z[case.prefix + "s0"]), bits=case.bits,
                     signed=case.signed, keep_axes=case.keep_axes)
    check_parity("f32", "quantizer outputs (rel to max)", where,
                 max_rel_diff(y, z[case.prefix + "y"]), ATOL)


def test_every_lsq_layout_is_covered(quantizer_fixture):
  """The case table reads every LSQ group of the file (a new layout must not go untested)."""
  groups = {k.rsplit("/", 1)[0] for k in quantizer_fixture if k.startswith("lsq")}
  assert {c.prefix.rstrip("/") for c in lsq_cases(quantizer_fixture)} == groups
