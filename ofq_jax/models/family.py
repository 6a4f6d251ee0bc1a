"""What the package knows about a model family, declared once, in the family's own module
(``deit.FAMILY``, ``swin.FAMILY``; ``ofq_jax.models.FAMILIES`` lists them by
``config.arch``).

Read from here: how to build the model and its config presets (``create_model``,
``model_config``), which module paths the default quantization rules put at the
configured bits and which at W8A8 (``quant.rules``), and the reference's CGA targets
(``cga.targets`` of the recipes). Still declared elsewhere (issue 28 item 1, next): the
tracker's module-type groups (``models/tracker.py``, suffix patterns both families
share) and the reference / timm / torchvision name maps (``interop/names.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family. ``edge_layers`` / ``block_layers``: regexes that fully match module
  paths; the default rules quantize the edges (patch embedding, heads) W8A8 with LSQ
  weights and the block layers at the configured bits (spec 3.1). ``cga_targets``: the
  reference's CGA targets, a regex on dotted parameter paths (``rounded.cga_targets``)."""
  name: str  # config.arch
  create: Callable[..., nnx.Module]  # (config, rngs, *, dtype) -> model
  model_config: Callable[..., ml_collections.ConfigDict]  # (size, **overrides) -> config
  presets: Mapping[str, Mapping[str, Any]]
  edge_layers: str
  block_layers: str
  cga_targets: str
