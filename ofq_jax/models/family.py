"""What the package knows about a model family, declared once, in the family's own module
(``deit.FAMILY``, ``swin.FAMILY``; ``ofq_jax.models.FAMILIES`` lists them by
``config.arch``). No module outside a family's own names its layers: they read this.

Read from here: how to build the model and its config presets (``create_model``,
``model_config``), which module paths the default quantization rules put at the
configured bits and which at W8A8 (``quant.rules``), the reference's CGA targets
(``cga.targets`` of the recipes), the module type of every rounded tensor (the
oscillation tracker's groups and the plots), the block paths (per-block plots), the
torch names of the reference's and of the float library's state dicts
(``interop.names``), and how a quantized model is initialised from a float one
(``interop.quantize_from_float``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

KINDS = ("qk", "v", "proj", "fc1", "fc2", "reduction", "patch_embed", "head")
"""Module types of rounded tensors, as the paper's per-module analysis groups them."""
IMPLIED = "qk_implied"
"""The kind of QKR's factors ``W_q``, ``W_k``: followed by the tracker on StatsQ's grid,
never rounded by the model."""
FUSED_QKV = "qkv"
"""The kind of a fused ``(in, 3D)`` q/k/v kernel: reported as its q, k (``qk``) and v
columns."""

Rename = tuple[str, "str | Callable[[re.Match[str]], str]"]
"""``(regex, replacement)`` for ``re.sub`` on a dotted ofq_jax path."""


def _no_buffers(model: nnx.Module) -> dict[str, np.ndarray]:
  del model
  return {}


@dataclasses.dataclass(frozen=True)
class TorchNames:
  """How a family's state dicts name its entries. ``reference`` (the OFQ reference's
  quantized model) and ``float`` (timm / torchvision) rename dotted ofq_jax paths, in
  order, before the layer rules of ``interop.names`` (``kernel`` -> ``weight``, ...)
  apply. ``buffers``: the torch buffers ofq_jax derives instead of storing, by ofq_jax
  path (renamed like the rest); loading checks each against the derivation."""
  reference: tuple[Rename, ...] = ()
  float: tuple[Rename, ...] = ()
  float_format: str = "float"  # what the float checkpoints are called, for messages
  buffers: Callable[[nnx.Module], dict[str, np.ndarray]] = _no_buffers


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family. ``edge_layers`` / ``block_layers``: regexes that fully match module
  paths; the default rules quantize the edges (patch embedding, heads) W8A8 with LSQ
  weights and the block layers at the configured bits (spec 3.1). ``cga_targets``: the
  reference's CGA targets, a regex on dotted parameter paths (``rounded.cga_targets``).
  ``kinds``: ``(kind, regex)`` pairs, the first that fully matches a rounded tensor's
  name gives its module type (``KINDS``, ``IMPLIED`` or ``FUSED_QKV``). ``blocks``: a regex matching
  the path of a block (``blocks.3``), which per-block plots count. ``from_float(src, dst,
  quant, seed)`` copies a float model into the quantized one ``dst`` of the same
  architecture the way the reference does (random inits drawn from ``seed``). ``torch``:
  its state dicts' names (``TorchNames``); ``shape_keys``: the config keys checkpoint
  mismatch errors name; ``no_decay``: dotted parameter paths AdamW leaves undecayed, as
  the family's library does."""
  name: str  # config.arch
  create: Callable[..., nnx.Module]  # (config, rngs, *, dtype) -> model
  model_config: Callable[..., ml_collections.ConfigDict]  # (size, **overrides) -> config
  presets: Mapping[str, Mapping[str, Any]]
  edge_layers: str
  block_layers: str
  cga_targets: str
  kinds: tuple[tuple[str, str], ...]
  blocks: str
  from_float: Callable[[nnx.Module, nnx.Module, ml_collections.ConfigDict, int], None]
  torch: TorchNames = TorchNames()
  shape_keys: str = "size, num_classes, img_size"  # config keys that fix the state's shapes
  no_decay: tuple[str, ...] = ()  # 2-D+ parameters the library does not decay (timm's)

  def kind(self, name: str) -> str:
    """The module type of a rounded tensor's dotted name (``other`` when none fits)."""
    for kind, pattern in self.kinds:
      if re.fullmatch(pattern, name):
        return kind
    return "other"
