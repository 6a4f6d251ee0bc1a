"""The float checkpoint format of each model family: timm / FB for DeiT, torchvision for
Swin (``config.arch``), behind one loader for the stages and ``ofq_jax.evaluate``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from flax import nnx

from ofq_jax.interop.checkpoints import load_timm_deit
from ofq_jax.interop.torchvision_swin import load_torchvision_swin

FLOAT_FORMATS = {"deit": ("timm / FB DeiT", load_timm_deit),
                 "swin": ("torchvision Swin", load_torchvision_swin)}


def load_float(state_or_path: Mapping[str, Any] | str | os.PathLike[str],
               config: ml_collections.ConfigDict, *, dtype: Any = None) -> nnx.Module:
  """The float model of ``config``'s family from its usual checkpoint format."""
  return FLOAT_FORMATS[config.get("arch", "deit")][1](state_or_path, config, dtype=dtype)


def float_format(config: ml_collections.ConfigDict) -> str:
  """What that format is called (for messages)."""
  return FLOAT_FORMATS[config.get("arch", "deit")][0]
