"""Which quantized products of a model run on integer levels, and why the others do not.

``products(model)`` traces one forward pass of a copy of the model (abstractly: no
arithmetic runs) with every product's decision recorded (``integer.decide``, the one
place that makes it) and named by its module path: ``blocks.0.mlp.fc1``,
``blocks.0.attn.logits``, ... The decisions are those of the platform traced for
(``ofq_jax.target``): ``quant.matmul='auto'`` is fake on a CPU, integer on a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ofq_jax.models.layers import PatchEmbed
from ofq_jax.paths import dotted
from ofq_jax.quant import integer


def products(model: nnx.Module, batch: int = 1) -> list[integer.Decision]:
  """Every product of ``model``'s eval forward on ``batch`` images, in call order."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)  # the same arrays; names are set on the copy only
  for path, module in nnx.iter_modules(copy):
    if hasattr(type(module), "product_name"):
      module.product_name = dotted(tuple(path))
  embed = next(m for _, m in nnx.iter_modules(copy) if isinstance(m, PatchEmbed))
  images = jax.ShapeDtypeStruct((batch, embed.img_size, embed.img_size,
                                 embed.kernel.shape[2]), jnp.float32)
  with integer.recording() as decisions:
    nnx.eval_shape(lambda m, x: m(x, train=False), copy, images)
  seen, out = set(), []
  for decision in decisions:
    if decision.product not in seen:
      seen.add(decision.product)
      out.append(decision)
  return out


def as_lines(decisions: list[integer.Decision]) -> list[str]:
  """``name  path`` per product, and a count of those on integers."""
  width = max((len(d.product) for d in decisions), default=0)
  on_integers = sum(d.plan is not None for d in decisions)
  return ([f"{on_integers} of {len(decisions)} products run on integer levels"]
          + [f"  {d.product:<{width}}  {d.path}" for d in decisions])
