"""Load and export float checkpoints (each family's library: timm / FB DeiT, torchvision
Swin) and OFQ-reference ones, through the family's torch names (``Family.torch``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.errors import UserError
from ofq_jax.interop.files import read_state_dict
from ofq_jax.interop.buffers import derived_buffers
from ofq_jax.interop.names import Renames, entries, state_to_torch, statsq_clip_key
from ofq_jax.paths import dotted
from ofq_jax.models.attention import QKRAttention
from ofq_jax.models.config import float_config, qk_form
from ofq_jax.models import create_model, family_of
from ofq_jax.models.dtypes import param_dtype, state_dtype
from ofq_jax.models.rounded import rounded_tensors
from ofq_jax.models.layers import PatchEmbed, QDense

STATSQ_CLIP_VAL = 2.0
"""The reference's fixed (non-trainable) StatsQ ``clip_val`` buffer."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's keys or shapes do not fit the model; lists every offender."""


def _quantized_modules(model: nnx.Module) -> list[str]:
  """Paths of the layers that quantize anything (QKR attention is quantized by design)."""
  names = []
  for path, module in nnx.iter_modules(model):
    spec = getattr(module, "spec", None)
    quantizes = spec is not None and (spec.quantize_weights or spec.quantize_acts)
    if isinstance(module, QKRAttention) or (
        isinstance(module, (QDense, PatchEmbed)) and quantizes):
      names.append(dotted(path))
  return names


def reference_names(model: nnx.Module) -> Renames:
  """The module names of the reference's state dicts for this model's family."""
  return family_of(model.config).torch.reference


def reference_buffers(model: nnx.Module) -> dict[str, np.ndarray]:
  """The reference's StatsQ ``clip_val`` buffers that ofq_jax does not store (one per
  StatsQ-rounded tensor, in the model's floating dtype)."""
  clip = np.array([STATSQ_CLIP_VAL], state_dtype(model))
  renames = reference_names(model)
  return {statsq_clip_key(t, renames): clip for t in rounded_tensors(model)
          if t.method == "statsq"}


def _load_into(model: nnx.Module, state: Mapping[str, np.ndarray], *,
               buffers: Mapping[str, np.ndarray], may_be_missing: Callable[[str], bool],
               source: str, dtype: np.dtype, renames: Renames) -> None:
  """Checks keys and shapes (all problems in one error), then assigns."""
  table = entries(nnx.state(model), renames)
  expected = {e.key: e for e in table}
  problems = []
  for key, entry in expected.items():
    if key not in state:
      if not may_be_missing(key):
        problems.append(f"  missing    {key}: expected shape {entry.torch_shape}")
    elif tuple(np.shape(state[key])) != entry.torch_shape:
      problems.append(f"  mis-shaped {key}: expected shape {entry.torch_shape}, found "
                      f"{tuple(np.shape(state[key]))}")
  for key, value in buffers.items():
    if key not in state:
      problems.append(f"  missing    {key}: expected shape {tuple(value.shape)}")
    elif tuple(np.shape(state[key])) != tuple(value.shape):
      problems.append(f"  mis-shaped {key}: expected shape {tuple(value.shape)}, found "
                      f"{tuple(np.shape(state[key]))}")
    elif not np.allclose(state[key], value):
      problems.append(f"  unsupported {key}: not the {key.rsplit('.', 1)[-1]} this config "
                      f"derives ({_head(value)}), found {_head(state[key])}")
  for key in state:
    if key not in expected and key not in buffers:
      problems.append(f"  unexpected {key}: found shape {tuple(np.shape(state[key]))}")
  if problems:
    raise _mismatch(source, model, problems)
  flat = nnx.to_flat_state(nnx.state(model))
  for entry, (_, leaf) in zip(table, flat):
    if entry.key in state:
      leaf.set_value(jnp.asarray(entry.from_torch(state[entry.key]), dtype))
  nnx.update(model, nnx.from_flat_state(flat))


def _mismatch(source: str, model: nnx.Module, problems: list[str]) -> CheckpointMismatchError:
  """Every problem of a checkpoint in one error, naming the config keys to check."""
  return CheckpointMismatchError(
      f"{source} does not fit the model built from this config ({len(problems)} "
      "problem(s)):\n" + "\n".join(problems) +
      "\nCheck the config (" + family_of(model.config).shape_keys + ") against the "
      "checkpoint.")


def _head(values: Any, count: int = 4) -> str:
  """The first ``count`` values of an array, for a message."""
  flat = np.asarray(values).ravel()
  return str(flat[:count].tolist()) + ("..." if flat.size > count else "")


def _describe(state_or_path: Any) -> str:
  if isinstance(state_or_path, (str, os.PathLike)):
    return f"Checkpoint {os.fspath(state_or_path)!r}"
  return "The state dict"


def load_float(state_or_path: Mapping[str, Any] | str | os.PathLike[str],
               config: ml_collections.ConfigDict, *, dtype: Any = None) -> nnx.Module:
  """The float model of ``config``'s family from its library's checkpoint (dict, .pth,
  .npz, .safetensors): timm / FB for DeiT, torchvision for Swin (``Family.torch``).

  ``config`` fixes the architecture; its ``quant`` block is ignored. ``dtype``: the
  model state's dtype; ``None`` keeps the checkpoint's float32 / float64 where JAX can
  hold it (``ofq_jax.models.dtypes.param_dtype``). Raises CheckpointMismatchError
  listing every missing, unexpected or mis-shaped key and every derived buffer (Swin's
  position indices) that does not match the config.
  """
  state = read_state_dict(state_or_path)
  dtype = param_dtype(dtype, state.values())
  model = create_model(float_config(config), dtype=dtype)
  names = family_of(config).torch.float
  _load_into(model, state, buffers=derived_buffers(model, names),
             may_be_missing=lambda key: False,
             source=_describe(state_or_path), dtype=dtype, renames=names)
  return model


def float_format(config: ml_collections.ConfigDict) -> str:
  """What the float checkpoints of ``config``'s family are called (for messages)."""
  return family_of(config).torch.float_format


def export_float(float_model: nnx.Module) -> dict[str, np.ndarray]:
  """Reverse of ``load_float``: the library's keys and layouts (derived buffers
  included), loadable with strict=True."""
  quantized = _quantized_modules(float_model)
  if quantized:
    raise ValueError("Exporting a float checkpoint takes a float model; these layers are "
                     f"quantized: {quantized[:5]}{'...' if len(quantized) > 5 else ''}. Use "
                     "export_ofq_torch for quantized models.")
  names = family_of(float_model.config).torch.float
  out = state_to_torch(nnx.state(float_model), names)
  out.update(derived_buffers(float_model, names))
  return out


def load_timm_deit(state_or_path: Mapping[str, Any] | str | os.PathLike[str],
                   config: ml_collections.ConfigDict, *, dtype: Any = None) -> nnx.Module:
  """A float DeiT from a timm / FB DeiT checkpoint: ``load_float`` of a DeiT config."""
  _check_family(config, "deit", "load_timm_deit")
  return load_float(state_or_path, config, dtype=dtype)


def export_timm_deit(float_model: nnx.Module) -> dict[str, np.ndarray]:
  """Reverse of ``load_timm_deit``: timm keys and layouts, loadable with strict=True."""
  _check_family(float_model.config, "deit", "export_timm_deit")
  return export_float(float_model)


def _check_family(config: ml_collections.ConfigDict, family: str, function: str) -> None:
  if family_of(config).name != family:
    raise UserError(f"{function} reads and writes {family} models; model.arch="
                    f"{family_of(config).name!r}: use load_float / export_float.")


_NO_PRODUCT = ("{what}, but the OFQ reference format has no W_qk parameter: it stores W_q "
               "and W_k, and a full-rank b-bit W_q^T W_k cannot be factored back. Export "
               "the packed integers instead (python -m ofq_jax.export, "
               "ofq_jax.export.export_integer).")


def load_ofq_torch(state_or_path: Mapping[str, Any] | str | os.PathLike[str],
                   config: ml_collections.ConfigDict, *, calibrated: bool = True,
                   dtype: Any = None) -> nnx.Module:
  """A quantized DeiT or Swin from a checkpoint of the OFQ reference implementation.

  The released ``.pth.tar`` files hold the weights under ``"state_dict"``.
  ``config.quant`` must describe the checkpoint (bits, attention, weight method).
  With ``calibrated=False`` the LSQ step sizes (keys ending in ``.s``) may be
  absent, as in a model saved before its first forward; run ``calibrate`` then.
  ``dtype`` as in ``load_timm_deit`` (float64 runs the model in float64 end to end).
  """
  if not config.quant.enabled:
    raise ValueError("load_ofq_torch needs config.quant.enabled=True (and the checkpoint's "
                     "bits / attention / weight_method); use load_timm_deit for float DeiTs.")
  if qk_form(config.quant) == "product":
    raise UserError("load_ofq_torch: model.quant.qk_form='product' holds W_qk as a parameter; "
                    "the reference's checkpoints hold W_q and W_k: load them with "
                    "qk_form='factors'.")
  state = dict(read_state_dict(state_or_path))
  dtype = param_dtype(dtype, state.values())
  model = create_model(config, dtype=dtype)
  names = reference_names(model)
  may_be_missing = (lambda key: False) if calibrated else (lambda key: key.endswith(".s"))
  buffers = {**reference_buffers(model), **derived_buffers(model, names)}
  _load_into(model, state, buffers=buffers, may_be_missing=may_be_missing,
             source=_describe(state_or_path), dtype=dtype, renames=names)
  return model


def export_ofq_torch(model: nnx.Module) -> dict[str, np.ndarray]:
  """Reverse of ``load_ofq_torch``: reference keys, layouts and buffers (strict-loadable).

  Refuses QKR in the product form (``quant.qk_form='product'``, e.g. after CGA with
  ``cga.include_qk``): the reference stores ``W_q`` and ``W_k``, and a full-rank b-bit
  ``W_qk`` cannot be factored back (spec 3.5); ``ofq_jax.export`` packs it instead.
  """
  for path, module in nnx.iter_modules(model):
    if isinstance(module, QKRAttention) and module.qk_kernel is not None:
      raise UserError(_NO_PRODUCT.format(what=f"{dotted(path)} holds W_qk as a parameter "
                                              "(quant.qk_form='product', e.g. after CGA "
                                              "with cga.include_qk=True)"))
    if isinstance(module, QKRAttention) and module.key_bias is not None:
      raise ValueError(f"{dotted(path)} has the qk_bias='fold' key bias, which the reference "
                       "model cannot hold; export a model built with qk_bias='drop'.")
  names = reference_names(model)
  out = state_to_torch(nnx.state(model), names)
  out.update(reference_buffers(model))
  out.update(derived_buffers(model, names))
  return out
