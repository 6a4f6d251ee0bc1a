"""torchvision Swin state dicts in and out (the float Swin; OFQ's Swin teacher and init).

torchvision names stages ``features.1, 3, 5, 7`` and the merges between them
``features.2, 4, 6`` (``swin.FAMILY.torch``). Its ``relative_position_index`` buffers are
not stored here (``ofq_jax.models.swin`` derives them from the window): loading checks
each against that derivation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.interop.checkpoints import _check_family, export_float, load_float


def load_torchvision_swin(state_or_path: Mapping[str, Any] | str | os.PathLike[str],
                          config: ml_collections.ConfigDict, *, dtype: Any = None
                          ) -> nnx.Module:
  """A float Swin from a torchvision Swin state dict: ``load_float`` of a Swin config
  (``ofq_jax.models.swin.model_config``)."""
  _check_family(config, "swin", "load_torchvision_swin")
  return load_float(state_or_path, config, dtype=dtype)


def export_torchvision_swin(model: nnx.Module) -> dict[str, np.ndarray]:
  """The torchvision state dict of a float Swin (position indices included)."""
  _check_family(model.config, "swin", "export_torchvision_swin")
  return export_float(model)
