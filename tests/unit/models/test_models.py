"""DeiT construction, configs, rules and calibration on tiny models (and the
224 px timm parameter counts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ofq_jax.models import calibrate, create_model, model_config
from ofq_jax.models.quantizers import ImageQuantizer
from ofq_jax.quant.rules import FLOAT, QuantRules, QuantSpec, parse_rule, parse_spec


def n_params(model) -> int:
  return int(sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))))


@pytest.mark.parametrize("size,distilled,count", [
    ("tiny", False, 5_717_416), ("tiny", True, 5_910_800),
    ("small", False, 22_050_664), ("small", True, 22_436_432)])
def test_timm_parameter_counts_and_run(size, distilled, count):
  """timm's counts (spec 8) for DeiT-T / DeiT-S at 224 px, and one forward pass."""
  model = create_model(model_config(size, distilled=distilled))
  assert n_params(model) == count
  logits = jax.jit(lambda x: nnx.merge(*nnx.split(model))(x))(jnp.zeros((1, 224, 224, 3)))
  assert logits.shape == (1, 1000) and bool(jnp.all(jnp.isfinite(logits)))


def tiny(**quant):
  return model_config(None, embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32,
                      num_classes=5, quant=quant)


IMAGES = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))


@pytest.mark.parametrize("quant", [
    dict(enabled=True, attention="qkr", weight_bits=2, act_bits=2),
    dict(enabled=True, attention="standard", weight_bits=3, act_bits=3),
    dict(enabled=True, attention="standard", weight_method="lsq", weight_bits=4, act_bits=4),
])
def test_tiny_quantized_models_train_and_eval(quant):
  model = create_model(tiny(**quant))
  calibrate(model, IMAGES)
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss_and_grad(state):
    def loss(state):
      cls_logits, dist_logits = nnx.merge(graphdef, state)(IMAGES, train=True)
      return jnp.mean(cls_logits ** 2) + jnp.mean(dist_logits ** 2)
    return jax.value_and_grad(loss)(state)

  value, grads = loss_and_grad(state)
  assert np.isfinite(float(value))
  flat = [g for g in jax.tree.leaves(grads)]
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in flat) > 0
  eval_logits, (cls_logits, dist_logits) = nnx.jit(
      lambda m: (m(IMAGES, train=False), m(IMAGES, train=True)))(model)
  np.testing.assert_allclose(eval_logits, (cls_logits + dist_logits) / 2, atol=1e-6)


def test_non_distilled_model_returns_one_head():
  model = create_model(model_config(None, embed_dim=64, depth=1, num_heads=2, patch_size=8,
                                    img_size=32, num_classes=5, distilled=False))
  out = model(IMAGES, train=True)  # Logits: dist is cls without a distillation head
  assert out.cls.shape == (4, 5) and out.dist is out.cls
  assert model.pos_embed.shape == (1, 17, 64)


def test_calibrate_sets_steps_from_data():
  """The first quantizer (image, per colour channel) gets 2*mean|x|/sqrt(127) after
  flipping to signed; the head's per-tensor step is set; calibration mode is left."""
  model = create_model(tiny(enabled=True))
  calibrate(model, IMAGES)
  quantizer = model.patch_embed.input_quant
  assert float(quantizer.signed[...][0]) == 1.0
  expected = 2 * np.mean(np.abs(np.asarray(IMAGES)), axis=(0, 1, 2)) / np.sqrt(127)
  np.testing.assert_allclose(quantizer.step[...], expected, rtol=1e-5)
  assert float(model.head.input_quant.step[...][0]) != 1.0
  assert not quantizer.calibrating
  with pytest.raises(ValueError, match="no LSQ quantizer"):
    calibrate(create_model(tiny()), IMAGES)


def test_image_quantizer_sign_is_sticky():
  quantizer = ImageQuantizer(8, 3)
  positive = jnp.abs(IMAGES)
  quantizer(positive)
  assert float(quantizer.signed[...][0]) == 0.0
  quantizer(IMAGES)
  assert float(quantizer.signed[...][0]) == 1.0
  quantizer(positive)
  assert float(quantizer.signed[...][0]) == 1.0


def test_rules_assign_bits_per_layer():
  config = tiny(enabled=True, weight_bits=2, act_bits=2,
                rules=(r"blocks\.0\.mlp\..*=float", r"blocks\.1\.attn=w4a3",
                       r"head_dist=w8a8:lsq"))
  model = create_model(config)
  assert model.blocks[0].mlp.fc1.spec == FLOAT and model.blocks[0].mlp.fc1.input_quant is None
  assert model.blocks[1].attn.spec == QuantSpec(4, 3, "statsq")
  assert model.blocks[1].attn.proj.spec == QuantSpec(2, 2, "statsq")  # default rule
  assert model.blocks[0].attn.spec == QuantSpec(2, 2, "statsq")
  assert model.head.spec == QuantSpec(8, 8, "lsq")
  calibrate(model, IMAGES)
  assert bool(jnp.all(jnp.isfinite(model(IMAGES))))
  # A float layer has exactly the float parameters.
  float_fc1 = {k for k, _ in nnx.to_flat_state(nnx.state(model.blocks[0].mlp.fc1))}
  assert float_fc1 == {("kernel",), ("bias",)}


def test_lsq_grad_batch_reaches_every_activation_quantizer():
  """quant.lsq_grad_batch = 1 on a batch of 4 multiplies every activation step gradient
  by sqrt(4 / 1) (g = 1/sqrt(Qp*M), M counting the batch), user rules included; weight
  steps (no batch axis) keep theirs."""
  def step_grads(grad_batch):
    model = create_model(tiny(enabled=True, attention="standard", weight_method="lsq",
                              weight_bits=2, act_bits=2, lsq_grad_batch=grad_batch,
                              rules=(r"blocks\.1\.mlp\.fc1=w4a4:lsq",)))
    calibrate(model, IMAGES)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(IMAGES) ** 2)))(model)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(grads)
            if k[-1] == "step"}
  base, one = step_grads(None), step_grads(1)
  activation = [k for k in base if "weight_quant" not in k]
  assert "blocks/1/mlp/fc1/input_quant/step" in activation  # from the user rule
  assert "patch_embed/input_quant/step" in activation  # the image quantizer
  for key in base:
    ratio = 2.0 if key in activation else 1.0
    np.testing.assert_allclose(one[key], base[key] * ratio, rtol=1e-5, atol=1e-12, err_msg=key)


def test_a_rule_matching_no_layer_is_an_error():
  with pytest.raises(ValueError, match=r"^error: quant.rules \['blocks\\\\.9\\\\..\*'\] "
                     r"match no layer of this model; fix the regex .*blocks.0.attn"):
    create_model(tiny(enabled=True, rules=(r"blocks\.9\..*=float", "head=float")))


def test_rule_parsing():
  assert parse_spec("float") == FLOAT
  assert parse_spec("W3A4:LSQ") == QuantSpec(3, 4, "lsq")
  pattern, spec = parse_rule(("blocks\\.0\\..*", {"weight_bits": 4, "act_bits": 4}))
  assert pattern.fullmatch("blocks.0.mlp.fc1") and spec == QuantSpec(4, 4)
  rules = QuantRules([parse_rule("blocks\\.0\\..*=w4a4"), parse_rule("blocks\\..*=w2a2")])
  assert rules("blocks.0.attn") == QuantSpec(4, 4)
  assert rules("blocks.10.attn") == QuantSpec(2, 2)
  assert rules("head") == FLOAT
  with pytest.raises(ValueError, match="Cannot parse"):
    parse_spec("int4")
  with pytest.raises(ValueError, match="no '='"):
    parse_rule("blocks")
  with pytest.raises(ValueError, match="bad regex"):
    parse_rule("blocks[=float")


@pytest.mark.parametrize("quant,match", [
    (dict(enabled=True, weight_bits=1), r"model.quant.weight_bits=1 is not an integer in \[2, 8\]"),
    (dict(enabled=True, act_bits=16), r"model.quant.act_bits=16 is not an integer in \[2, 8\]"),
    (dict(enabled=True, weight_method="lsq"), "needs quant.attention='standard'"),
    (dict(enabled=True, attention="linear"), "quant.attention='linear' is not one of"),
    (dict(enabled=True, qk_bias="keep"), "quant.qk_bias='keep'"),
])
def test_bad_quant_config_errors(quant, match):
  with pytest.raises(ValueError, match=match):
    create_model(tiny(**quant))


def test_bad_shape_config_errors():
  with pytest.raises(ValueError, match="embed_dim=64 is not divisible by num_heads=3"):
    create_model(model_config(None, embed_dim=64, num_heads=3, depth=1, img_size=32,
                              patch_size=8))
  with pytest.raises(ValueError, match="img_size=30 is not divisible by patch_size=8"):
    create_model(model_config(None, embed_dim=64, num_heads=2, depth=1, img_size=30,
                              patch_size=8))
  with pytest.raises(KeyError, match="unknown field 'width'"):
    model_config("tiny", width=3)
  with pytest.raises(KeyError, match="unknown quant field 'bits'"):
    model_config("tiny", quant=dict(bits=2))
  with pytest.raises(ValueError, match="Unknown DeiT size"):
    model_config("huge")


def test_nchw_images_are_rejected_with_a_fix():
  model = create_model(tiny())
  with pytest.raises(ValueError, match="transpose\\(0, 2, 3, 1\\)"):
    model(jnp.zeros((2, 3, 32, 32)))


def test_presets():
  assert model_config("small").embed_dim == 384 and model_config("small").num_heads == 6
  config = model_config("tiny", depth=2, quant=dict(enabled=True, weight_bits=3))
  assert (config.depth, config.quant.weight_bits, config.quant.act_bits) == (2, 3, 2)
