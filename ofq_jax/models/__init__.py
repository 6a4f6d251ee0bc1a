"""The model families (DeiT, Swin; float and quantized), their configs and the
data-dependent LSQ calibration. ``create_model`` builds either from its config
(``config.arch``: absent or ``'deit'`` for DeiT, ``'swin'`` for Swin)."""

from typing import Any

import ml_collections
from flax import nnx

from ofq_jax.models import deit, swin
from ofq_jax.models.calibrate import calibrate
from ofq_jax.models.config import float_config, model_config, quantized_config
from ofq_jax.models.deit import DeiT, Logits
from ofq_jax.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (deit.FAMILY, swin.FAMILY)}
"""Every model family by ``config.arch`` (``models.family``)."""


def family_of(config: ml_collections.ConfigDict) -> Family:
  """The family of a model config (``arch``; DeiT configs may omit it)."""
  arch = config.get("arch", "deit")
  if arch not in FAMILIES:
    raise ValueError(f"model.arch={arch!r} is not one of {sorted(FAMILIES)}.")
  return FAMILIES[arch]


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs | int = 0, *,
                 dtype: Any = None) -> nnx.Module:
  """The model ``config`` describes, of its family (``family_of``)."""
  return family_of(config).create(config, rngs, dtype=dtype)


__all__ = ["DeiT", "FAMILIES", "Family", "Logits", "calibrate", "create_model", "family_of",
           "float_config", "model_config", "quantized_config"]
