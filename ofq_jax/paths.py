"""NNX state paths: jax key paths into an ``nnx.State`` <-> ``('blocks', 0, 'attn')``
<-> the dotted names (``blocks.0.attn.q_kernel``) that configs, metrics and CGA use."""

from __future__ import annotations

from typing import Any

import jax


def dotted(path: tuple[str | int, ...]) -> str:
  return ".".join(str(p) for p in path)


def state_path(keypath: tuple[Any, ...]) -> tuple[str | int, ...]:
  """A jax key path into an NNX State (``DictKey``s, then the Variable's ``.value``)
  as the state path ``('blocks', 0, 'attn', 'q_kernel')``."""
  parts = []
  for entry in keypath:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(entry.key)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(entry.idx)
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      if entry.name != "value":
        parts.append(entry.name)
    else:
      parts.append(str(entry))
  return tuple(parts)
