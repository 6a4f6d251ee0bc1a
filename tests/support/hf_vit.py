"""A model family the package was not written for (issue 28 item 2), declared here alone.

A small ViT named the way Hugging Face's models name their layers: attention with
separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` projections, an MLP of
``ffn.up`` / ``ffn.down``, ``embeddings.patch_embeddings`` and a ``classifier`` head; its
float state dict is keyed like ``transformers``' (``vit.encoder.layer.0...``). It is
built from the package's layers (``QDense``, ``PatchEmbed``, ``QKRAttention`` under its
own ``AttentionNames``) and reaches the package only through ``FAMILY``: the tests
register it in ``ofq_jax.models.FAMILIES`` (the registry line) and everything else, the
default rules, QKR, CGA targets, tracker groups, the integer path, the packed export, the
float name map and the copy from a float model, reads the declaration.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ofq_jax.models import from_float
from ofq_jax.models.attention import AttentionNames, QKRAttention
from ofq_jax.models.config import check_patches_and_precision, check_qk_form, family_config
from ofq_jax.models.dtypes import build
from ofq_jax.models.family import Family, TorchNames
from ofq_jax.models.layers import PER_TENSOR, PatchEmbed, QDense, erf_gelu, per_token
from ofq_jax.models.quant_keys import check_quant
from ofq_jax.quant.rules import QuantRules, QuantSpec

ARCH = "hf_vit"
PRESETS = {"micro": dict(embed_dim=32, depth=2, num_heads=2)}
FIELDS: dict[str, Any] = dict(
    arch=ARCH, size=None, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=4,
    img_size=16, in_chans=3, num_classes=5, layer_norm_eps=1e-12, precision="highest")


def model_config(size: str | None = "micro", **overrides: Any) -> ml_collections.ConfigDict:
  return family_config(ARCH, FIELDS, PRESETS, size, overrides)


def validate_config(config: ml_collections.ConfigDict) -> None:
  check_patches_and_precision(config)
  check_quant(config.quant, ARCH)
  check_qk_form(config.quant)


def num_tokens(config: ml_collections.ConfigDict) -> int:
  return (config.img_size // config.patch_size) ** 2 + 1


class SelfAttention(nnx.Module):
  """Float (or per-layer quantized) attention with separate projections."""

  def __init__(self, config: ml_collections.ConfigDict, rules: QuantRules, prefix: str,
               rngs: nnx.Rngs):
    dim, self.heads = config.embed_dim, config.num_heads
    self.precision = config.precision
    dense = dict(rngs=rngs, input_steps=per_token(num_tokens(config)))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      setattr(self, name, QDense(dim, dim, spec=rules(f"{prefix}.{name}"), **dense))

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    split = lambda t: jnp.reshape(t, (batch, tokens, self.heads, dim // self.heads))
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    logits = jnp.einsum("bihe,bjhe->bhij", q, k, precision=self.precision)
    probs = jax.nn.softmax(logits * (dim // self.heads) ** -0.5, axis=-1)
    out = jnp.einsum("bhij,bjhe->bihe", probs, v, precision=self.precision)
    return self.o_proj(jnp.reshape(out, (batch, tokens, dim)))


class QKRSelfAttention(QKRAttention):
  """The package's QKR under this family's parameter names."""
  names = AttentionNames(q="q_proj", k="k_proj", v="v_proj", v_bias="v_proj_bias",
                         out="o_proj")


class FeedForward(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, rules: QuantRules, prefix: str,
               rngs: nnx.Rngs):
    dim, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    dense = dict(rngs=rngs, input_steps=per_token(num_tokens(config)))
    self.up = QDense(dim, hidden, spec=rules(f"{prefix}.up"), **dense)
    self.down = QDense(hidden, dim, spec=rules(f"{prefix}.down"), **dense)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(erf_gelu(self.up(x)))


class Layer(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, index: int, rules: QuantRules,
               rngs: nnx.Rngs):
    prefix, dim = f"encoder.{index}", config.embed_dim
    norm = dict(epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs)
    self.layernorm_before = nnx.LayerNorm(dim, **norm)
    if config.quant.enabled and config.quant.attention == "qkr":
      self.attention = QKRSelfAttention(
          dim, config.num_heads, spec=rules(f"{prefix}.attention"),
          proj_spec=rules(f"{prefix}.attention.o_proj"), num_tokens=num_tokens(config),
          rngs=rngs)
    else:
      self.attention = SelfAttention(config, rules, f"{prefix}.attention", rngs)
    self.layernorm_after = nnx.LayerNorm(dim, **norm)
    self.ffn = FeedForward(config, rules, f"{prefix}.ffn", rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.layernorm_before(x))
    return x + self.ffn(self.layernorm_after(x))


class Embeddings(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, spec: QuantSpec, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.patch_embeddings = PatchEmbed(config.img_size, config.patch_size, config.in_chans,
                                       dim, spec=spec, rngs=rngs)
    init = nnx.initializers.truncated_normal(stddev=0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim)))
    self.position_embeddings = nnx.Param(init(rngs.params(), (1, num_tokens(config), dim)))

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.patch_embeddings(images)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...]


class HFViT(nnx.Module):
  def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    validate_config(config)
    self.config = config
    rules = QuantRules.from_config(config.quant, FAMILY, config.precision)
    self.embeddings = Embeddings(config, rules("embeddings.patch_embeddings"), rngs)
    self.encoder = nnx.List([Layer(config, i, rules, rngs) for i in range(config.depth)])
    self.layernorm = nnx.LayerNorm(config.embed_dim, epsilon=config.layer_norm_eps,
                                   use_fast_variance=False, rngs=rngs)
    self.classifier = QDense(config.embed_dim, config.num_classes, spec=rules("classifier"),
                             rngs=rngs, input_steps=PER_TENSOR)
    rules.check_all_matched()

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # one head: its logits serve both KD heads (losses.heads)
    x = self.embeddings(images)
    for layer in self.encoder:
      x = layer(x)
    return self.classifier(self.layernorm(x)[:, 0])


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs | int = 0, *,
                 dtype: Any = None) -> HFViT:
  return build(HFViT, config, rngs, dtype)


def copy_from_float(src: HFViT, dst: HFViT, quant: ml_collections.ConfigDict,
                    seed: int) -> None:
  """Every weight copied (no reference quirks to reproduce); QKR takes ``W_q``, ``W_k``
  from ``q_proj``, ``k_proj`` and drops their biases."""
  del quant, seed
  copy = from_float.copy
  s_emb, d_emb = src.embeddings, dst.embeddings
  copy(d_emb.patch_embeddings.kernel, s_emb.patch_embeddings.kernel)
  copy(d_emb.patch_embeddings.bias, s_emb.patch_embeddings.bias)
  copy(d_emb.cls_token, s_emb.cls_token)
  copy(d_emb.position_embeddings, s_emb.position_embeddings)
  for s_layer, d_layer in zip(src.encoder, dst.encoder):
    from_float.copy_norm(d_layer.layernorm_before, s_layer.layernorm_before)
    from_float.copy_norm(d_layer.layernorm_after, s_layer.layernorm_after)
    from_float.copy_dense(d_layer.ffn.up, s_layer.ffn.up)
    from_float.copy_dense(d_layer.ffn.down, s_layer.ffn.down)
    s_attn, d_attn = s_layer.attention, d_layer.attention
    from_float.copy_dense(d_attn.o_proj, s_attn.o_proj)
    if isinstance(d_attn, QKRAttention):
      copy(d_attn.q_proj, s_attn.q_proj.kernel)
      copy(d_attn.k_proj, s_attn.k_proj.kernel)
      copy(d_attn.v_proj, s_attn.v_proj.kernel)
      copy(d_attn.v_proj_bias, s_attn.v_proj.bias)
    else:
      for name in ("q_proj", "k_proj", "v_proj"):
        from_float.copy_dense(getattr(d_attn, name), getattr(s_attn, name))
  from_float.copy_norm(dst.layernorm, src.layernorm)
  from_float.copy_dense(dst.classifier, src.classifier)


_LAYER = r"encoder\.\d+"
FAMILY = Family(
    ARCH, create_model, model_config, PRESETS,
    edge_layers=r"embeddings\.patch_embeddings|classifier",
    block_layers=_LAYER + r"\..*",
    cga_targets=_LAYER + r"\.(ffn\.(up|down)\.kernel|attention\.(o_proj\.kernel|v_proj|"
                         r"[qkv]_proj\.kernel))",
    shape_keys="size, embed_dim, depth, num_heads, num_classes, img_size",
    no_decay=("embeddings.cls_token", "embeddings.position_embeddings"),
    kinds=(("qk", _LAYER + r"\.attention\.(qk_product|[qk]_proj\.kernel)"),
           ("qk_implied", _LAYER + r"\.attention\.[qk]_proj"),
           ("v", _LAYER + r"\.attention\.v_proj(\.kernel)?"),
           ("proj", _LAYER + r"\.attention\.o_proj\.kernel"),
           ("fc1", _LAYER + r"\.ffn\.up\.kernel"),
           ("fc2", _LAYER + r"\.ffn\.down\.kernel"),
           ("patch_embed", r"embeddings\.patch_embeddings\..*"),
           ("head", r"classifier\.kernel")),
    blocks=_LAYER,
    torch=TorchNames(float=((r"^encoder\.(\d+)\.", r"vit.encoder.layer.\1."),
                            (r"^embeddings\.patch_embeddings\.",
                             "vit.embeddings.patch_embeddings.projection."),
                            (r"^(embeddings|layernorm)\.", r"vit.\1.")),
                     float_format="Hugging Face-style ViT"),
    from_float=copy_from_float)
