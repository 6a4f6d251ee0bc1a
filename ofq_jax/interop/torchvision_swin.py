"""torchvision ``swin_t`` state dicts in and out (the float Swin; OFQ's Swin teacher and init).

torchvision names stages ``features.1, 3, 5, 7`` and the merges between them
``features.2, 4, 6``; ``ofq_jax.interop.names.swin_name`` maps the module paths. Its
``relative_position_index`` buffers are not stored here (``ofq_jax.models.swin``
derives them from the window): loading checks each against that derivation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.interop.checkpoints import _describe, _load_into, take_position_indices
from ofq_jax.interop.files import read_state_dict
from ofq_jax.interop.names import state_to_torch
from ofq_jax.models.config import float_config
from ofq_jax.models.dtypes import param_dtype
from ofq_jax.interop.swin_buffers import INDEX_SUFFIX, position_indices
from ofq_jax.models.swin import SwinTransformer, create_model


def load_torchvision_swin(state_or_path: Mapping[str, Any] | str | os.PathLike[str],
                          config: ml_collections.ConfigDict, *, dtype: Any = None
                          ) -> SwinTransformer:
  """A float Swin from a torchvision Swin state dict (dict, .pth, .npz, .safetensors).

  ``config`` (``ofq_jax.models.swin.model_config``) fixes the architecture. Raises
  ``CheckpointMismatchError`` listing every missing, unexpected or mis-shaped key and
  every position index that does not match the config's window.
  """
  state = dict(read_state_dict(state_or_path))
  dtype = param_dtype(dtype, [v for k, v in state.items() if not k.endswith(INDEX_SUFFIX)])
  model = create_model(float_config(config), dtype=dtype)
  take_position_indices(state, model, _describe(state_or_path))
  _load_into(model, state, buffers={}, may_be_missing=lambda key: False,
             source=_describe(state_or_path), dtype=dtype, family="swin")
  return model


def export_torchvision_swin(model: SwinTransformer) -> dict[str, np.ndarray]:
  """The torchvision state dict of a float Swin (position indices included)."""
  out = state_to_torch(nnx.state(model), family="swin")
  out.update(position_indices(model))
  return out
