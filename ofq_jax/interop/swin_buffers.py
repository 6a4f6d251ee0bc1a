"""Swin's ``relative_position_index`` buffers: derived from the window here, stored in
torchvision's and the reference's state dicts (one per block, flattened ``(N*N,)``)."""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np
from flax import nnx

from ofq_jax.models.swin import relative_position_index

INDEX_SUFFIX = ".attn.relative_position_index"


def index_keys(model: nnx.Module) -> list[str]:
  """The buffer keys of every block (``features.{2s+1}.{i}.attn.relative_position_index``)."""
  return [f"features.{2 * s + 1}.{i}{INDEX_SUFFIX}"
          for s, blocks in enumerate(model.stages) for i in range(len(blocks))]


def position_indices(model: nnx.Module) -> dict[str, np.ndarray]:
  """``{key: index}`` as torch stores them (int64)."""
  index = relative_position_index(model.config.window_size).ravel().astype(np.int64)
  return {key: index for key in index_keys(model)}


def pop_position_indices(state: MutableMapping[str, np.ndarray], model: nnx.Module
                         ) -> list[str]:
  """Removes the index buffers from ``state``; returns a line per missing or wrong one."""
  problems = []
  for key, expected in position_indices(model).items():
    found = state.pop(key, None)
    if found is None:
      problems.append(f"  missing    {key}: expected shape {expected.shape}")
    elif np.shape(found) != expected.shape or not np.array_equal(found, expected):
      problems.append(f"  mis-shaped {key}: not the position index of window "
                      f"{model.config.window_size} (shape {np.shape(found)})")
  return problems
