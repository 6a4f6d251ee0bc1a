"""Reading checkpoint files into ``{name: numpy array}`` without needing torch.

Formats: a dict (of numpy arrays or torch tensors), ``.npz``, ``.safetensors``,
and torch pickles (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``; torch is imported
only for these). FB DeiT files wrap the weights in ``"model"``, OFQ / timm
training checkpoints in ``"state_dict"``; DDP's ``module.`` prefix is removed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ofq_jax.errors import MissingInputError

StateDict = dict[str, np.ndarray]
TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".tar")
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, without importing torch
    return value.detach().cpu().numpy()
  return np.asarray(value)


def _load_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"Reading {path!r} needs PyTorch (pip install torch), or convert it "
                      "to .npz / .safetensors first.") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception:  # pylint: disable=broad-except
    # timm training checkpoints pickle an argparse.Namespace ("args"): trusted files only.
    return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(state_or_path: Mapping[str, Any] | str | os.PathLike[str]) -> StateDict:
  """Flat ``{key: float array}`` of a checkpoint dict or file."""
  if isinstance(state_or_path, (str, os.PathLike)):
    path = os.fspath(state_or_path)
    if not os.path.exists(path):
      raise MissingInputError(f"Checkpoint {path!r} does not exist.")
    if path.endswith(".npz"):
      with np.load(path) as data:
        raw: Any = {k: data[k] for k in data.files}
    elif path.endswith(".safetensors"):
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
      raw = load_file(path)
    elif path.endswith(TORCH_SUFFIXES):
      raw = _load_torch(path)
    else:
      raise ValueError(f"Unknown checkpoint format {path!r}: use .pth/.pth.tar/.pt (torch), "
                       ".npz or .safetensors.")
  else:
    raw = state_or_path
  if not isinstance(raw, Mapping):
    raise TypeError(f"A checkpoint must be a mapping of names to arrays, got {type(raw)}.")
  for wrapper in WRAPPER_KEYS:
    if wrapper in raw and isinstance(raw[wrapper], Mapping):
      raw = raw[wrapper]
      break
  state = {}
  for key, value in raw.items():
    key = key[len("module."):] if key.startswith("module.") else key
    state[key] = _to_numpy(value)
  return state
