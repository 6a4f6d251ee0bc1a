"""DeiT (timm-compatible) as a Flax NNX module, float or quantized from one config.

``ofq_jax.models.config.model_config(size='tiny', **overrides)`` gives the ConfigDict;
``create_model`` builds the model. ``model(images, train=False)`` takes NHWC float32 (or, with a float64
state under ``jax_enable_x64``, float64) images and
returns logits; a distilled model returns ``(cls + dist) / 2`` in eval mode and
``Logits(cls, dist)`` in train mode (spec 5.1, 8).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ofq_jax.models.attention import QKRAttention, StandardAttention
from ofq_jax.models.dtypes import build
from ofq_jax.models.fences import residual_fence
from ofq_jax.models.layers import PER_TENSOR, Mlp, PatchEmbed, QDense, per_token
from ofq_jax.models.config import PRESETS, check_images, model_config, validate_config
from ofq_jax.models import from_float
from ofq_jax.models.family import Family, TorchNames
from ofq_jax.quant.rules import QuantRules

def num_tokens(config: ml_collections.ConfigDict) -> int:
  """Patches plus the cls (and dist) token: 198 for a distilled DeiT at 224 px."""
  return (config.img_size // config.patch_size) ** 2 + (2 if config.distilled else 1)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

  def __init__(self, config: ml_collections.ConfigDict, index: int, rules: QuantRules,
               rngs: nnx.Rngs):
    dim, eps = config.embed_dim, config.layer_norm_eps
    tokens = num_tokens(config)
    prefix = f"blocks.{index}"
    norm = dict(epsilon=eps, use_fast_variance=False, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, **norm)
    attn_cls = QKRAttention if (config.quant.enabled and config.quant.attention == "qkr") \
        else StandardAttention
    self.attn = attn_cls(dim, config.num_heads, spec=rules(f"{prefix}.attn"),
                         proj_spec=rules(f"{prefix}.attn.proj"), num_tokens=tokens, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, **norm)
    self.mlp = Mlp(dim, int(dim * config.mlp_ratio), fc1_spec=rules(f"{prefix}.mlp.fc1"),
                   fc2_spec=rules(f"{prefix}.mlp.fc2"), input_steps=per_token(tokens),
                   rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = residual_fence(x)
    x = x + self.attn(self.norm1(x))
    x = residual_fence(x)
    return x + self.mlp(self.norm2(x))


class Logits(NamedTuple):
  """Train-mode output: both heads (``dist`` is ``cls`` for a model without one)."""
  cls: jax.Array
  dist: jax.Array


class DeiT(nnx.Module):
  """DeiT / distilled DeiT; quantized where ``config.quant`` rules say so."""

  def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    validate_config(config)
    self.config = config
    self.distilled = bool(config.distilled)
    rules = QuantRules.from_config(config.quant, FAMILY, config.precision)
    dim = config.embed_dim
    tokens = num_tokens(config)
    self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, dim,
                                  spec=rules("patch_embed.proj"), rngs=rngs)
    token_init = nnx.initializers.truncated_normal(stddev=0.02)
    self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, dim)))
    self.dist_token = (nnx.Param(token_init(rngs.params(), (1, 1, dim)))
                       if self.distilled else None)
    self.pos_embed = nnx.Param(token_init(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([Block(config, i, rules, rngs) for i in range(config.depth)])
    self.norm = nnx.LayerNorm(dim, epsilon=config.layer_norm_eps, use_fast_variance=False,
                              rngs=rngs)
    head = dict(rngs=rngs, input_steps=PER_TENSOR)
    self.head = QDense(dim, config.num_classes, spec=rules("head"), **head)
    self.head_dist = (QDense(dim, config.num_classes, spec=rules("head_dist"), **head)
                      if self.distilled else None)
    rules.check_all_matched()

  def features(self, images: jax.Array) -> jax.Array:
    """Final-normed tokens ``(B, N, D)``."""
    check_images(images, self.config, "DeiT")
    x = self.patch_embed(images)
    batch = x.shape[0]
    prefix = [jnp.broadcast_to(self.cls_token[...], (batch, 1, x.shape[-1]))]
    if self.dist_token is not None:
      prefix.append(jnp.broadcast_to(self.dist_token[...], (batch, 1, x.shape[-1])))
    x = jnp.concatenate(prefix + [x], axis=1) + self.pos_embed[...]
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array | Logits:
    """Eval: the logits (the two heads' mean when distilled); train: ``Logits``."""
    x = self.features(images)
    logits = self.head(x[:, 0])
    if self.head_dist is None:
      return Logits(logits, logits) if train else logits
    dist_logits = self.head_dist(x[:, 1])
    if train:
      return Logits(logits, dist_logits)
    return (logits + dist_logits) / 2


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs | int = 0, *,
                 dtype: Any = None) -> DeiT:
  """Builds the (float or quantized) DeiT described by ``config``.

  ``dtype``: the state's floating dtype (float32 by default; float64 needs
  ``jax_enable_x64``, see ``ofq_jax.models.dtypes``).
  """
  return build(DeiT, config, rngs, dtype)


def copy_from_float(src: DeiT, dst: DeiT, quant: ml_collections.ConfigDict, seed: int) -> None:
  """``Family.from_float`` of DeiT: every shared weight copied, each block's attention
  by ``from_float.init_attention`` with two keys of ``seed`` per block."""
  if src.config.embed_dim != dst.config.embed_dim or len(src.blocks) != len(dst.blocks):
    raise ValueError(f"Float model (embed_dim={src.config.embed_dim}, depth={len(src.blocks)})"
                     f" does not match the config (embed_dim={dst.config.embed_dim}, depth="
                     f"{dst.config.depth}).")
  keys = iter(jax.random.split(jax.random.key(seed), 2 * len(dst.blocks)))
  from_float.copy(dst.patch_embed.kernel, src.patch_embed.kernel)
  from_float.copy(dst.patch_embed.bias, src.patch_embed.bias)
  for name in ("cls_token", "dist_token", "pos_embed"):
    if (getattr(src, name) is None) != (getattr(dst, name) is None):
      raise ValueError(f"Float and quantized configs disagree on {name} (distilled?).")
    if getattr(dst, name) is not None:
      from_float.copy(getattr(dst, name), getattr(src, name))
  for s_block, d_block in zip(src.blocks, dst.blocks):
    from_float.copy_norm(d_block.norm1, s_block.norm1)
    from_float.copy_norm(d_block.norm2, s_block.norm2)
    from_float.copy_dense(d_block.mlp.fc1, s_block.mlp.fc1)
    from_float.copy_dense(d_block.mlp.fc2, s_block.mlp.fc2)
    from_float.init_attention(d_block.attn, s_block.attn, quant, next(keys), next(keys))
  from_float.copy_norm(dst.norm, src.norm)
  from_float.copy_dense(dst.head, src.head)
  if dst.head_dist is not None:
    from_float.copy_dense(dst.head_dist, src.head_dist)


def block_kinds(block: str) -> tuple[tuple[str, str], ...]:
  """``Family.kinds`` of a DeiT block's tensors under the block paths ``block`` (a regex):
  Swin's blocks are DeiT's."""
  return (("qkv", block + r"\.attn\.qkv\.kernel"),
          ("qk", block + r"\.attn\.qk_product"),
          ("qk_implied", block + r"\.attn\.[qk]_kernel"),
          ("v", block + r"\.attn\.v_kernel"),
          ("proj", block + r"\.attn\.proj\.kernel"),
          ("fc1", block + r"\.mlp\.fc1\.kernel"),
          ("fc2", block + r"\.mlp\.fc2\.kernel"))


FAMILY = Family(
    "deit", create_model, model_config, PRESETS,
    edge_layers=r"patch_embed\.proj|head|head_dist",
    block_layers=r"blocks\.\d+\..*",
    # The reference's: fc1, fc2, proj and v (QKR) or qkv (standard) of every block.
    cga_targets=(r"blocks\.\d+\.(mlp\.fc1\.kernel|mlp\.fc2\.kernel|attn\.proj\.kernel|"
                 r"attn\.v_kernel|attn\.qkv\.kernel)"),
    shape_keys="size, depth, num_classes, distilled, img_size, quant.attention, "
               "quant.weight_method",
    no_decay=("pos_embed", "cls_token", "dist_token"),  # timm's DeiT.no_weight_decay
    kinds=block_kinds(r"blocks\.\d+") + (("patch_embed", r"patch_embed\..*"),
                                          ("head", r"head(_dist)?\.kernel")),
    blocks=r"blocks\.\d+",
    # timm and the reference alike: the patch embedding's conv is ``patch_embed.proj``.
    torch=TorchNames(reference=((r"^patch_embed\.", "patch_embed.proj."),),
                     float=((r"^patch_embed\.", "patch_embed.proj."),),
                     float_format="timm / FB DeiT"),
    from_float=copy_from_float)
"""DeiT's module paths: ``patch_embed.proj``, ``blocks.{i}.attn``, ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc1`` / ``fc2``, ``head``, ``head_dist``."""
