"""Build the quantized model of a config from a float one, the way the reference does
(spec 3, SWIN.md 5): the family's own ``from_float`` (``ofq_jax.models.family``)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from ofq_jax.models import family_of
from ofq_jax.models.dtypes import state_dtype


def quantize_from_float(float_model: nnx.Module, config: ml_collections.ConfigDict, *,
                        seed: int = 0) -> nnx.Module:
  """The quantized model of ``config`` initialised from ``float_model`` (its family's).

  As the reference: every shared weight is copied; QKR splits ``qkv`` into
  ``q``, ``k``, ``v`` and drops ``b_q``, ``b_k`` (or folds ``b_q`` into a key
  bias with ``quant.qk_bias='fold'``); ``attn.proj`` (and ``qkv`` of standard
  attention) get torch's default random init unless ``quant.attn_proj_init`` /
  ``quant.attn_qkv_init`` is ``'pretrained'`` (spec 7.1); with ``quant.qk_form=
  'product'`` QKR holds ``W_q^T W_k`` itself, computed from the split. Step sizes are
  placeholders until ``calibrate``; move biases start at zero. ``seed`` drives
  the random inits. The quantized state takes the float model's dtype (float32,
  or float64 under ``jax_enable_x64``). A Swin also gets its position tables
  re-drawn (``quant.position_table_init``) and a random bias on each patch-merging
  reduction, which the float model does not have (SWIN.md 5).
  """
  if not config.quant.enabled:
    raise ValueError("quantize_from_float needs config.quant.enabled=True.")
  family = family_of(config)
  source = family_of(float_model.config)
  if source.name != family.name:
    raise ValueError(f"The float model is a {source.name} (model.arch), the config a "
                     f"{family.name}: quantize a float model of the config's family.")
  model = family.create(config, nnx.Rngs(seed), dtype=state_dtype(float_model))
  family.from_float(float_model, model, config.quant, seed)
  return model
