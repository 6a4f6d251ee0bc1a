"""Parameter names and layouts: ofq_jax state paths <-> timm / OFQ-reference keys.

Every entry of a model's flat NNX state gets a reference key and a pair of
layout transforms: the family's renames (``Family.torch``: its module names in timm /
torchvision or in the reference) and then the layer rules here. The same table serves
the float models (timm / torchvision keys) and the quantized ones (the reference's
``state_dict`` keys, spec 8.1), and is also used to export gradients for the parity
tests.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from ofq_jax.models.family import Rename
from ofq_jax.paths import dotted


Array = np.ndarray


def _transpose(a: Array) -> Array:
  return np.ascontiguousarray(np.asarray(a).T)


def _conv_to_torch(a: Array) -> Array:  # (kh, kw, in, out) -> (out, in, kh, kw)
  return np.ascontiguousarray(np.transpose(np.asarray(a), (3, 2, 0, 1)))


def _conv_from_torch(a: Array) -> Array:  # (out, in, kh, kw) -> (kh, kw, in, out)
  return np.ascontiguousarray(np.transpose(np.asarray(a), (2, 3, 1, 0)))


def _flatten(a: Array) -> Array:
  return np.reshape(np.asarray(a), (-1,))


# (regex on the dotted ofq_jax path after the family's renames, torch key template,
# layout kind); first match wins. Layer attributes only: a family's module names are
# its declaration's (``Family.torch``). A 4-D ``kernel`` is a conv (``conv``, not ``dense``).
_RULES: list[tuple[re.Pattern[str], str, str]] = [(re.compile(p), t, k) for p, t, k in [
    # QKR attention (spec 3.5): the input quantizer and its biases sit in quant_x_4_qkv.
    (r"(.+\.attn)\.input_quant\.step", r"\1.quant_x_4_qkv.input_quant_fn.s", "same"),
    (r"(.+\.attn)\.(move_b4|move_aft)", r"\1.quant_x_4_qkv.\2.bias", "same"),
    (r"(.+\.attn)\.([qkv])_kernel", r"\1.\2.weight", "dense"),
    (r"(.+\.attn)\.v_bias", r"\1.v.bias", "same"),
    (r"(.+\.attn)\.qkx_quant\.step", r"\1.quan_a_qkx_fn.s", "flatten"),
    (r"(.+\.attn)\.(q|k|v|softmax)_quant\.step", r"\1.quan_a_\2_fn.s", "same"),
    # Generic Dense / LayerNorm / QDense pieces.
    (r"(.+)\.kernel", r"\1.weight", "dense"),
    (r"(.+)\.scale", r"\1.weight", "same"),
    (r"(.+)\.input_quant\.step", r"\1.input_quant_fn.s", "same"),
    (r"(.+)\.input_quant\.signed", r"\1.input_quant_fn.signed", "same"),
    (r"(.+)\.weight_quant\.step", r"\1.lsqw_fn.s", "same"),
    (r"(.+)\.(move_\w+)", r"\1.\2.bias", "same"),
    (r"(.+)", r"\1", "same"),
]]

_TO_TORCH: dict[str, Callable[[Array], Array]] = {
    "same": np.asarray, "dense": _transpose, "conv": _conv_to_torch, "flatten": _flatten}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One state entry: its ofq_jax path, reference key and layouts."""
  path: tuple[str | int, ...]
  key: str
  kind: str
  jax_shape: tuple[int, ...]

  @property
  def torch_shape(self) -> tuple[int, ...]:
    return tuple(self.to_torch(np.zeros(self.jax_shape, np.float32)).shape)

  def to_torch(self, value: Array) -> Array:
    return _TO_TORCH[self.kind](value)

  def from_torch(self, value: Array) -> Array:
    value = np.asarray(value)
    if self.kind == "dense":
      return _transpose(value)
    if self.kind == "conv":
      return _conv_from_torch(value)
    return np.reshape(value, self.jax_shape)


Renames = tuple[Rename, ...]
"""A family's torch names (``Family.torch.reference`` or ``.float``)."""


def renamed(name: str, renames: Renames) -> str:
  """A dotted ofq_jax path in a family's torch module names (``re.sub`` in order)."""
  for pattern, replacement in renames:
    name = re.sub(pattern, replacement, name)
  return name


def torch_key(path: tuple[str | int, ...], renames: Renames = (), ndim: int = 2
              ) -> tuple[str, str]:
  """Reference key and layout kind of an ofq_jax state path of ``ndim`` dimensions."""
  name = renamed(dotted(path), renames)
  for pattern, template, kind in _RULES:
    match = pattern.fullmatch(name)
    if match:
      return match.expand(template), "conv" if kind == "dense" and ndim == 4 else kind
  raise AssertionError(name)  # the last rule matches everything


def entries(state: nnx.State, renames: Renames = ()) -> list[Entry]:
  """The name table of every leaf of an NNX state (a model's, or its gradients')."""
  table = []
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    key, kind = torch_key(path, renames, np.ndim(value))
    table.append(Entry(tuple(path), key, kind, tuple(np.shape(value))))
  return table


def state_to_torch(state: nnx.State, renames: Renames = ()) -> dict[str, Array]:
  """``{reference key: array in torch layout}`` for every leaf of ``state``."""
  out = {}
  for entry, (_, leaf) in zip(entries(state, renames), nnx.to_flat_state(state)):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    out[entry.key] = entry.to_torch(np.asarray(value))
  return out


REFERENCE_MARKERS = (".input_quant_fn.s", ".lsqw_fn.s", ".statsq_fn.clip_val",
                     ".qk_quant.clip_val")
"""Key endings only the OFQ reference's quantized models have (its quantizer modules)."""

# The reference's StatsQ module holding each rounded tensor's fixed clip_val buffer.
_STATSQ_MODULES = {"kernel": "statsq_fn", "qk_product": "qk_quant", "v_kernel": "v_quant"}


def statsq_clip_key(tensor: Any, renames: Renames = ()) -> str:
  """Reference key of the ``clip_val`` buffer of a StatsQ-rounded tensor
  (``ofq_jax.models.rounded.RoundedTensor``)."""
  name = renamed(dotted(tensor.path), renames)
  return f"{name}.{_STATSQ_MODULES[tensor.attr]}.clip_val"
