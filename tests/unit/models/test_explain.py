"""Which products run on integer levels, and why the others do not (``models/explain.py``,
``integer.decide``): each listed under its module path, each fallback with its reason."""

import pytest

from ofq_jax.models import create_model, explain, model_config, swin

SHAPE = dict(img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)


def decisions(**quant):
  model = create_model(model_config(None, **SHAPE, quant=dict(enabled=True, **quant)))
  return {d.product: d for d in explain.products(model)}


def test_integer_mode_names_every_product_and_the_reasons_for_fake():
  """A rule keeps one layer float; the patch embedding is fake by construction."""
  got = decisions(matmul="integer", rules=(r"blocks\.1\.mlp\.fc2=float",))
  per_block = ("attn.v", "attn.keys", "attn.logits", "attn.values", "attn.proj", "mlp.fc1",
               "mlp.fc2")
  assert list(got) == (["patch_embed"] + [f"blocks.{b}.{p}" for b in (0, 1) for p in per_block]
                       + ["head", "head_dist"])
  fake = {name: d.why for name, d in got.items() if d.plan is None}
  assert fake == {"patch_embed": "its image quantizer's steps are per pixel, on the contracted "
                                 "axis", "blocks.1.mlp.fc2": "a float layer (quant.rules)"}
  assert explain.as_lines(list(got.values()))[0] == "15 of 17 products run on integer levels"


def test_fake_mode_and_standard_attention():
  got = decisions(matmul="fake", attention="standard")
  assert "blocks.0.attn.qkv" in got and "blocks.0.attn.logits" in got
  assert all(d.plan is None for d in got.values())
  assert got["blocks.0.attn.qkv"].why == "quant.matmul='fake'"


def test_sums_past_the_exact_range_fall_back_with_the_bound():
  """fc2 at 8 bits over 1088 inputs: unsigned input levels up to 255, StatsQ's odd weight
  levels up to 255, so sums up to 1088 * 255 * 255 > 2^24, the float32 sums' exact range:
  fake-quant, and the listing says why."""
  model = create_model(model_config(None, **{**SHAPE, "mlp_ratio": 34.0}, quant=dict(
      enabled=True, matmul="integer", matmul_operands="float32",
      rules=(r"blocks\.0\.mlp\.fc2=w8a8",))))
  got = {d.product: d for d in explain.products(model)}
  assert got["blocks.0.mlp.fc2"].plan is None
  assert "not exact" in got["blocks.0.mlp.fc2"].why and f"{1088 * 255 * 255:,}" in got[
      "blocks.0.mlp.fc2"].why
  assert got["blocks.1.mlp.fc2"].plan is not None  # 2 bits: exact


def test_swin_products_are_named_by_their_paths():
  config = swin.model_config(None, embed_dim=16, depths=(2,), num_heads=(2,), img_size=16,
                             patch_size=4, window_size=4, num_classes=4,
                             quant=dict(enabled=True, matmul="integer"))
  got = {d.product: d for d in explain.products(create_model(config))}
  assert {"stages.0.0.attn.logits", "stages.0.1.mlp.fc2", "head"} <= set(got)
  assert sum(d.plan is not None for d in got.values()) == len(got) - 1


@pytest.mark.parametrize("matmul", ["integer"])
def test_listing_leaves_the_model_unnamed(matmul):
  model = create_model(model_config(None, **SHAPE, quant=dict(enabled=True, matmul=matmul)))
  explain.products(model)
  assert model.blocks[0].mlp.fc1.product_name == ""  # the names were set on a copy
