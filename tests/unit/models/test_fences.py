"""The residual fence: identity both ways, and a DeiT gradient XLA no longer re-sums per block."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ofq_jax.models import calibrate, create_model, deit, model_config
from ofq_jax.models.fences import residual_fence


def test_fence_is_the_identity_forward_and_backward():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 7)), jnp.float32)
  loss = lambda v: jnp.sum(jnp.tanh(v) * v ** 2)
  np.testing.assert_array_equal(residual_fence(x), x)
  np.testing.assert_array_equal(jax.grad(lambda v: loss(residual_fence(v)))(x),
                                jax.grad(loss)(x))


def _widest_fusion(model: nnx.Module, images: jax.Array) -> int:
  """Operand count of the widest fusion XLA builds for the model's input gradient."""
  graphdef, state = nnx.split(model)
  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(images, train=True).cls ** 2)
  text = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
  return max(m.group(1).count("%") for m in re.finditer(r"fusion\((.*?)\), kind", text))


def test_deit_gradient_has_no_fusion_that_grows_with_depth(monkeypatch):
  """Without the fence every block's gradient fusion re-adds all later blocks' terms
  (168 operands at depth 6, 326 at 12); with it the widest has 22 at any depth."""
  config = model_config(None, embed_dim=32, depth=6, num_heads=2, patch_size=8, img_size=16,
                        num_classes=4, quant=dict(enabled=True, weight_bits=2, act_bits=2))
  model = create_model(config, nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  calibrate(model, images)
  fenced = _widest_fusion(model, images)
  monkeypatch.setattr(deit, "residual_fence", lambda x: x)
  unfenced = _widest_fusion(model, images)
  assert fenced < 40 and unfenced > 100, (fenced, unfenced)
