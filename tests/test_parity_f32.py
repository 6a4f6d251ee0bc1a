"""Whole-model parity with the reference's distilled DeiT fixtures (QKR, StatsQ, LSQ).

Every expected value comes from ``../shared/fixtures/deit_*_seed0.npz``: outputs
of the authors' PyTorch implementation (see its README for the procedure).
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import max_rel_diff
from ofq_jax.interop import load_ofq_torch, load_timm_deit
from ofq_jax.interop.names import state_to_torch
from ofq_jax.models import calibrate
from ofq_jax.quant import cga_frozen_mask

ATOL = 1e-5
GRAD_RTOL = 1e-4
# Key-side "after" biases add the same vector to every key of a query row; softmax is
# shift-invariant, so their true gradient is exactly zero and the reference's values are
# float noise (~1e-8). For these both sides must be negligible instead.
ZERO_GRADIENT_SUFFIXES = ("attn.move_k_aft.bias", "attn.move_qkx_aft.bias")


def test_float_model_reproduces_fp_logits(deit_fixture):
  model = load_timm_deit(deit_fixture.group("fp"), deit_fixture.config())
  logits = model(jnp.asarray(deit_fixture.images("x_eval")), train=False)
  np.testing.assert_allclose(logits, deit_fixture.arrays["fp_logits"], rtol=0, atol=ATOL)


def test_calibrate_reproduces_qinit(deit_fixture):
  """precalib/ + x_calib -> every qinit/ step size and the image quantizer's sign."""
  model = load_ofq_torch(deit_fixture.group("precalib"), deit_fixture.config(), calibrated=False)
  before = state_to_torch(nnx.state(model))
  assert before["patch_embed.proj.input_quant_fn.signed"][0] == 0.0
  calibrate(model, jnp.asarray(deit_fixture.images("x_calib")))
  got = state_to_torch(nnx.state(model))
  expected = deit_fixture.group("qinit")
  steps = [k for k in expected if k.endswith(".s")]
  assert len(steps) > 10
  for key in steps + ["patch_embed.proj.input_quant_fn.signed"]:
    assert max_rel_diff(got[key], expected[key]) <= ATOL, key
  assert got["patch_embed.proj.input_quant_fn.signed"][0] == 1.0


def _quantized(deit_fixture):
  return load_ofq_torch(deit_fixture.group("q"), deit_fixture.config())


def test_quantized_outputs_match(deit_fixture):
  model = _quantized(deit_fixture)
  images = jnp.asarray(deit_fixture.images("x_eval"))
  z = deit_fixture.arrays
  np.testing.assert_allclose(model(images, train=False), z["eval_logits"], rtol=0, atol=ATOL)
  cls_logits, dist_logits = model(images, train=True)
  np.testing.assert_allclose(cls_logits, z["train_cls"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(dist_logits, z["train_dist"], rtol=0, atol=ATOL)


def test_gradients_match(deit_fixture):
  """grad of sum(train_cls*g_cls) + sum(train_dist*g_dist), exported to reference names."""
  model = _quantized(deit_fixture)
  images = jnp.asarray(deit_fixture.images("x_eval"))
  z = deit_fixture.arrays

  def loss(m):
    cls_logits, dist_logits = m(images, train=True)
    return jnp.sum(cls_logits * z["g_cls"]) + jnp.sum(dist_logits * z["g_dist"])

  grads = state_to_torch(nnx.grad(loss)(model))
  expected = deit_fixture.group("grad")
  assert set(grads) == set(expected)
  total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in expected.values()))
  for key, ref in expected.items():
    ours = grads[key]
    assert ours.shape == ref.shape, key
    if key.endswith(ZERO_GRADIENT_SUFFIXES):
      assert np.linalg.norm(ref) <= 1e-6 * total, key
      assert np.linalg.norm(ours) <= 1e-6 * total, key
      continue
    error = np.linalg.norm(ours - ref)
    assert error <= GRAD_RTOL * np.linalg.norm(ref), (key, error / np.linalg.norm(ref))


def test_cga_masks_on_model_weights(deit_fixture):
  """cga_mask/ fixtures: the frozen mask of every CGA target weight (BR 0.005)."""
  bits, boundary = deit_fixture.meta["bits"], deit_fixture.meta["cga_boundary_range"]
  weights = deit_fixture.group("q")
  masks = deit_fixture.group("cga_mask")
  assert masks
  for key, expected in masks.items():
    frozen = np.asarray(cga_frozen_mask(jnp.asarray(weights[key].T), bits, boundary)).T
    np.testing.assert_array_equal(frozen, expected == 1, err_msg=key)
