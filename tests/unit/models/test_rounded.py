"""One declaration of what each layer rounds, and the walk every consumer reads.

Expected names and reference keys are written out by hand from spec 3 / 8.1 (which
tensors the reference rounds and where its StatsQ ``clip_val`` buffers live).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ofq_jax.models import deit
from ofq_jax.interop.checkpoints import reference_buffers
from ofq_jax.models import create_model, model_config
from ofq_jax.models.rounded import cga_targets, rounded_tensors
from ofq_jax.quant.lsq import lsq_quantize
from ofq_jax.quant.statsq import statsq_quantize


def tiny(attention="qkr", weight_method="statsq", bits=2, rules=()):
  return create_model(model_config(
      None, embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=16, num_classes=10,
      quant=dict(enabled=True, attention=attention, weight_method=weight_method,
                 weight_bits=bits, act_bits=bits, rules=rules)))


def block_names(i, attention):
  """In NNX's module order (a layer after its sub-layers), as the tracker names them."""
  attn = (["attn.proj.kernel", "attn.v_kernel", "attn.qk_product"] if attention == "qkr"
          else ["attn.proj.kernel", "attn.qkv.kernel"])
  return [f"blocks.{i}.{n}" for n in attn + ["mlp.fc1.kernel", "mlp.fc2.kernel"]]


@pytest.mark.parametrize("attention,method", [("qkr", "statsq"), ("standard", "statsq"),
                                              ("standard", "lsq")])
def test_walk_names_methods_and_axes(attention, method):
  tensors = rounded_tensors(tiny(attention, method, bits=3))
  expected = (block_names(0, attention) + block_names(1, attention)
              + ["head.kernel", "head_dist.kernel", "patch_embed.kernel"])
  assert [t.name for t in tensors] == expected  # module order: it names the metrics
  for t in tensors:
    edge = t.name.startswith(("patch_embed", "head"))
    assert (t.method, t.bits) == (("lsq", 8) if edge else (method, 3)), t.name
    if t.attr == "qk_product":
      assert t.rounding.reduce_axes == (2,) and t.param is None  # per (head, row), derived
    elif t.name == "patch_embed.kernel":
      assert t.rounding.reduce_axes == (0, 1, 2) and t.param == t.name  # per out channel
    else:
      assert t.rounding.reduce_axes == (0,) and t.param == t.name


def test_float_layers_round_nothing():
  model = tiny(rules=(r"blocks\.0\..*=float", "head=float"))
  names = {t.name for t in rounded_tensors(model)}
  assert not any(n.startswith(("blocks.0.", "head.")) for n in names)
  assert "blocks.1.attn.qk_product" in names and "head_dist.kernel" in names


@pytest.mark.parametrize("attention,method", [("qkr", "statsq"), ("standard", "lsq")])
def test_forward_rounds_through_the_declaration(attention, method):
  """Each layer's rounded tensor equals the quantizer function applied by hand with the
  declared axes (the StatsQ / LSQ formulas are tested against the fixtures elsewhere)."""
  model = tiny(attention, method)
  modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
  for t in rounded_tensors(model):
    module = modules[t.path]
    value = module.value(t.attr)
    if t.method == "statsq":
      by_hand = statsq_quantize(value, t.bits, t.rounding.reduce_axes)
    else:
      keep = tuple(a for a in range(value.ndim) if a not in t.rounding.reduce_axes)
      by_hand = lsq_quantize(value, module.weight_quant.step[...], bits=t.bits, signed=True,
                             keep_axes=keep)
    np.testing.assert_array_equal(module.rounded(t.attr), by_hand, err_msg=t.name)
  if attention == "qkr":
    attn = model.blocks[0].attn
    np.testing.assert_array_equal(attn.quantized_qk_product(),
                                  statsq_quantize(attn.qk_product(), 2, (2,)))


def test_cga_targets_are_statsq_parameters():
  qkr = cga_targets(tiny("qkr"), deit.FAMILY.cga_targets)
  assert sorted(qkr) == sorted(n for i in range(2) for n in block_names(i, "qkr")
                               if not n.endswith("qk_product"))
  assert set(qkr.values()) == {2}
  standard = cga_targets(tiny("standard"), deit.FAMILY.cga_targets)
  assert "blocks.1.attn.qkv.kernel" in standard and len(standard) == 8
  assert cga_targets(tiny("standard", "lsq"), deit.FAMILY.cga_targets) == {}  # nothing StatsQ
  assert cga_targets(tiny("qkr"), r"nothing\.matches") == {}


def test_reference_buffers_follow_the_walk():
  """One clip_val per StatsQ tensor, under the reference's module names (spec 8.1)."""
  keys = set(reference_buffers(tiny("qkr")))
  expected = set()
  for i in range(2):
    expected |= {f"blocks.{i}.attn.qk_quant.clip_val", f"blocks.{i}.attn.v_quant.clip_val",
                 f"blocks.{i}.attn.proj.statsq_fn.clip_val",
                 f"blocks.{i}.mlp.fc1.statsq_fn.clip_val", f"blocks.{i}.mlp.fc2.statsq_fn.clip_val"}
  assert keys == expected
  assert reference_buffers(tiny("standard", "lsq")) == {}
  assert all(v.dtype == jnp.float32 for v in reference_buffers(tiny("qkr")).values())
