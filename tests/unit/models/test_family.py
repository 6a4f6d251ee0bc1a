"""Each model family's declaration (``ofq_jax.models.family``): the default rules it
gives put every layer of its models at the edge (W8A8, LSQ weights) or block bits, never
both, and its CGA targets are parameters the model rounds."""

import re

import pytest
from flax import nnx

from ofq_jax.models import FAMILIES, create_model, family_of, model_config, swin
from ofq_jax.models.rounded import cga_targets, rounded_tensors
from ofq_jax.quant.rules import QuantRules

QUANT = dict(enabled=True, weight_bits=3, act_bits=3, attention="qkr")
TINY = {"deit": lambda: model_config(None, embed_dim=32, depth=2, num_heads=2, img_size=16,
                                     patch_size=8, num_classes=4, quant=QUANT),
        "swin": lambda: swin.model_config(None, embed_dim=16, depths=(2, 1), num_heads=(1, 2),
                                          window_size=4, patch_size=2, img_size=16,
                                          num_classes=4, quant=QUANT)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_rules_split_every_layer_into_edges_and_blocks(name, monkeypatch):
  config = TINY[name]()
  family = family_of(config)
  assert family is FAMILIES[name] and family.name == config.get("arch", "deit")
  asked = []
  resolve = QuantRules.__call__
  monkeypatch.setattr(QuantRules, "__call__",
                      lambda self, path: asked.append(path) or resolve(self, path))
  nnx.eval_shape(lambda: create_model(config))
  assert asked
  for path in asked:
    edge = re.fullmatch(family.edge_layers, path) is not None
    block = re.fullmatch(family.block_layers, path) is not None
    assert edge != block, path
    spec = resolve(QuantRules.from_config(config.quant, family), path)
    assert (spec.weight_bits, spec.weight_method) == ((8, "lsq") if edge else (3, "statsq"))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_reference_cga_targets_are_rounded_parameters(name):
  model = nnx.eval_shape(lambda: create_model(TINY[name]()))
  targets = cga_targets(model, FAMILIES[name].cga_targets)
  kinds = {path.rsplit(".", 2)[-2] if path.endswith(".kernel") else path.rsplit(".", 1)[-1]
           for path in targets}
  expected = {"fc1", "fc2", "proj", "v_kernel"} | ({"reduction"} if name == "swin" else set())
  assert kinds == expected


def test_an_unknown_family_is_named():
  config = model_config(None, embed_dim=32, depth=1, num_heads=2)
  config.arch = "vit"
  with pytest.raises(ValueError, match=r"model.arch='vit' is not one of \['deit', 'swin'\]"):
    family_of(config)


@pytest.mark.parametrize("attention", ["qkr", "standard"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_rounded_tensor_has_a_declared_kind(name, attention):
  """The tracker's groups and the plots read ``Family.kinds``: no tensor of a family's
  model may fall into ``other``; a standard attention's fused kernel is ``qkv`` (split
  into q, k, v columns by the tracker), QKR's are its product and value kernel."""
  config = TINY[name]()
  config.quant.attention = attention
  model = nnx.eval_shape(lambda: create_model(config))
  family = FAMILIES[name]
  kinds = {family.kind(t.name) for t in rounded_tensors(model)}
  attention_kinds = {"qk", "v"} if attention == "qkr" else {"qkv"}
  assert kinds == attention_kinds | {"proj", "fc1", "fc2", "patch_embed", "head"} | (
      {"reduction"} if name == "swin" else set())
  blocks = {m.group(0) for t in rounded_tensors(model)
            for m in [re.match(family.blocks + r"\.", t.name)] if m}
  assert len(blocks) == (2 if name == "deit" else 3)
