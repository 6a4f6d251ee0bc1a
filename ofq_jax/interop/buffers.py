"""Torch buffers ofq_jax derives instead of storing (``Family.torch.buffers``: Swin's
``relative_position_index`` per block), in and out of state dicts; loading checks them
like the reference's StatsQ ``clip_val`` buffers (``checkpoints._load_into``)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from ofq_jax.interop.names import Renames, renamed
from ofq_jax.models import family_of


def derived_buffers(model: nnx.Module, renames: Renames) -> dict[str, np.ndarray]:
  """``{torch key: buffer}`` as torch stores them, under ``renames``' names."""
  buffers = family_of(model.config).torch.buffers(model)
  return {renamed(path, renames): value for path, value in buffers.items()}
