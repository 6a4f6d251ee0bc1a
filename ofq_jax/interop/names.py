"""Parameter names and layouts: ofq_jax state paths <-> timm / OFQ-reference keys.

Every entry of a model's flat NNX state gets a reference key and a pair of
layout transforms. The same table serves the float DeiT (timm / FB keys) and
the quantized one (the reference's ``state_dict`` keys, spec 8.1), and is also
used to export gradients for the parity tests.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

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


# (regex on the dotted ofq_jax path, torch key template, layout kind); first match wins.
_RULES: list[tuple[re.Pattern[str], str, str]] = [(re.compile(p), t, k) for p, t, k in [
    (r"patch_embed\.kernel", "patch_embed.proj.weight", "conv"),
    (r"features\.0\.0\.kernel", "features.0.0.weight", "conv"),  # Swin (torchvision)
    (r"patch_embed\.bias", "patch_embed.proj.bias", "same"),
    (r"patch_embed\.input_quant\.step", "patch_embed.proj.input_quant_fn.s", "same"),
    (r"patch_embed\.input_quant\.signed", "patch_embed.proj.input_quant_fn.signed", "same"),
    (r"patch_embed\.weight_quant\.step", "patch_embed.proj.lsqw_fn.s", "same"),
    (r"patch_embed\.(move_b4|move_aft)", r"patch_embed.proj.\1.bias", "same"),
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


# Swin's module paths -> torchvision's ``features.K...`` names (stage s is features.2s+1,
# the merge after it features.2s+2), before the rules above apply.
_SWIN_PATHS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"patch_norm\.(.+)"), lambda m: f"features.0.2.{m[1]}"),
    (re.compile(r"patch_embed\.(.+)"), lambda m: f"features.0.0.{m[1]}"),
    (re.compile(r"stages\.(\d+)\.(\d+)\.(.+)"),
     lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.{m[3]}"),
    (re.compile(r"merges\.(\d+)\.(.+)"), lambda m: f"features.{2 * int(m[1]) + 2}.{m[2]}"),
]
_SWIN_MLP = re.compile(r"\.mlp\.fc([12])\.")


FAMILIES = ("deit", "swin", "swin_ofq")
"""Name tables: DeiT (timm and the reference alike), Swin as torchvision names it, and
Swin as the OFQ reference names it (its MLP is ``mlp.fc1`` / ``mlp.fc2``)."""


def swin_name(name: str, family: str = "swin") -> str:
  """A Swin state path in torchvision's module names (``mlp.fc1`` -> ``mlp.0`` for
  torchvision; the reference's quantized Swin keeps ``fc1`` / ``fc2``)."""
  for pattern, rename in _SWIN_PATHS:
    match = pattern.fullmatch(name)
    if match:
      name = rename(match)
      break
  if family == "swin":
    name = _SWIN_MLP.sub(lambda m: ".mlp.0." if m[1] == "1" else ".mlp.3.", name)
  return name


def torch_key(path: tuple[str | int, ...], family: str = "deit") -> tuple[str, str]:
  """Reference key and layout kind of an ofq_jax state path (``family`` in FAMILIES)."""
  name = dotted(path)
  if family != "deit":
    name = swin_name(name, family)
  for pattern, template, kind in _RULES:
    match = pattern.fullmatch(name)
    if match:
      return match.expand(template), kind
  raise AssertionError(name)  # the last rule matches everything


def entries(state: nnx.State, family: str = "deit") -> list[Entry]:
  """The name table of every leaf of an NNX state (a model's, or its gradients')."""
  table = []
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    key, kind = torch_key(path, family)
    table.append(Entry(tuple(path), key, kind, tuple(np.shape(value))))
  return table


def state_to_torch(state: nnx.State, family: str = "deit") -> dict[str, Array]:
  """``{reference key: array in torch layout}`` for every leaf of ``state``."""
  out = {}
  for entry, (_, leaf) in zip(entries(state, family), nnx.to_flat_state(state)):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    out[entry.key] = entry.to_torch(np.asarray(value))
  return out


# The reference's StatsQ module holding each rounded tensor's fixed clip_val buffer.
_STATSQ_MODULES = {"kernel": "statsq_fn", "qk_product": "qk_quant", "v_kernel": "v_quant"}


def statsq_clip_key(tensor: Any, family: str = "deit") -> str:
  """Reference key of the ``clip_val`` buffer of a StatsQ-rounded tensor
  (``ofq_jax.models.rounded.RoundedTensor``)."""
  name = dotted(tensor.path)
  if family != "deit":
    name = swin_name(name, family)
  return f"{name}.{_STATSQ_MODULES[tensor.attr]}.clip_val"
