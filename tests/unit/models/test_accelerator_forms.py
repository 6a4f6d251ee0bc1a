"""The forms a model takes when traced for an accelerator (``target.compiling_for``: dots
over the tensors' own axes, QKR's keys and logits without flattening, int8 integer
operands, bf16 residuals) compute what the CPU forms compute: run both on this CPU and
compare values and gradients (the CPU forms are the ones the parity tiers judge)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ofq_jax import target
from ofq_jax.models import calibrate, create_model, deit, model_config
from ofq_jax.models.config import resolve_platform_defaults
from ofq_jax.quant import integer
from ofq_jax.quant.rules import QuantRules

from support.runs import digits_config


def _model(matmul: str, backward: str = "float32"):
  config = model_config(None, embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=16,
                        num_classes=10, quant=dict(enabled=True, matmul=matmul,
                                                   matmul_backward=backward))
  model = create_model(config, nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  calibrate(model, images)
  return model, images


def _loss_and_grads(model, images, platform: str):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest, copy=True)(images, train=True)
    return jnp.sum(jnp.square(logits.cls)) + jnp.sum(logits.dist)
  with target.compiling_for(platform):
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("matmul", ["fake", "integer"])
def test_accelerator_forms_give_the_cpu_forms_numbers(matmul):
  """float32 backward: the same loss and every gradient, to float32 rounding (the integer
  forward is exact in both, with int8 operands on the accelerator form)."""
  model, images = _model(matmul)
  cpu_loss, cpu_grads = _loss_and_grads(model, images, "cpu")
  tpu_loss, tpu_grads = _loss_and_grads(model, images, "tpu")
  np.testing.assert_allclose(tpu_loss, cpu_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(cpu_grads)[0],
                          jax.tree.leaves(tpu_grads)):
    # 1e-7: the floor of gradients that are rounding noise on both sides (QKR's keys'
    # move bias adds row constants the softmax ignores: its true gradient is zero).
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-4 * scale + 1e-7, err_msg=str(path))


def test_the_bf16_backward_keeps_bf16_residuals_and_close_gradients():
  """``matmul_backward='bf16'`` on the accelerator form: residuals stored in bfloat16 give
  the gradients the CPU form's explicit bf16 casts give, to bf16 rounding."""
  model, images = _model("integer", "bf16")
  cpu_loss, cpu_grads = _loss_and_grads(model, images, "cpu")
  tpu_loss, tpu_grads = _loss_and_grads(model, images, "tpu")
  np.testing.assert_allclose(tpu_loss, cpu_loss, rtol=1e-5)  # the forward is exact
  for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(tpu_grads)):
    np.testing.assert_allclose(b, a, rtol=0, atol=3e-2 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_auto_matmuls_resolve_per_platform():
  quant = model_config("tiny", quant=dict(enabled=True)).quant
  assert (quant.matmul, quant.matmul_backward) == ("auto", "auto")
  assert QuantRules.from_config(quant, deit.FAMILY)("blocks.0.attn").matmul == "fake"
  with target.compiling_for("tpu"):
    spec = QuantRules.from_config(quant, deit.FAMILY)("blocks.0.attn")
    assert (spec.matmul, spec.matmul_backward) == ("integer", "bf16")
    assert integer.plan(384, (-2, 1), (-3, 3)).operand == "int8"
    resolved = resolve_platform_defaults(digits_config())
  assert (resolved.model.quant.matmul, resolved.model.quant.matmul_backward) == (
      "integer", "bf16")
  on_cpu = resolve_platform_defaults(digits_config())
  assert (on_cpu.model.quant.matmul, on_cpu.model.quant.matmul_backward) == ("fake", "float32")
  explicit = digits_config(**{"model.quant.matmul": "fake"})
  with target.compiling_for("tpu"):
    assert resolve_platform_defaults(explicit).model.quant.matmul == "fake"
