"""Torch buffers ofq_jax derives instead of storing (``Family.torch.buffers``: Swin's
``relative_position_index`` per block), in and out of state dicts."""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np
from flax import nnx

from ofq_jax.interop.names import Renames, renamed
from ofq_jax.models import family_of


def derived_buffers(model: nnx.Module, renames: Renames) -> dict[str, np.ndarray]:
  """``{torch key: buffer}`` as torch stores them, under ``renames``' names."""
  buffers = family_of(model.config).torch.buffers(model)
  return {renamed(path, renames): value for path, value in buffers.items()}


def pop_derived_buffers(state: MutableMapping[str, np.ndarray], model: nnx.Module,
                        renames: Renames) -> list[str]:
  """Removes the derived buffers from ``state``; returns a line per missing or wrong one."""
  problems = []
  for key, expected in derived_buffers(model, renames).items():
    found = state.pop(key, None)
    if found is None:
      problems.append(f"  missing    {key}: expected shape {expected.shape}")
    elif np.shape(found) != expected.shape or not np.array_equal(found, expected):
      problems.append(f"  mis-shaped {key}: not the {key.rsplit('.', 1)[-1]} this config "
                      f"derives (shape {np.shape(found)})")
  return problems
