"""Parameter dtypes: float32 by default, float64 end to end under ``jax_enable_x64``.

Float64 is how parity is judged where float32 cannot tell a bug from a rounding
tie (a 2-bit level a few ulps from its threshold): given float64 states and
inputs, every model, quantizer, calibration, gradient and CGA mask here computes
in float64, and each constant follows its input's dtype. These helpers choose
and apply the floating dtype of a model's state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ofq_jax.compat import x64_enabled

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def param_dtype(dtype: Any = None, arrays: Iterable[Any] = ()) -> np.dtype:
  """The floating dtype to hold a model's state in.

  ``dtype=None`` keeps the source's precision where JAX can hold it: float64
  when ``arrays`` has a float64 entry and ``jax_enable_x64`` is on, float32
  otherwise. An explicit float64 without x64 is an error rather than a silent
  float32.
  """
  if dtype is None:
    wide = any(np.asarray(a).dtype == np.float64 for a in arrays)
    return np.dtype(np.float64 if wide and x64_enabled() else np.float32)
  dtype = np.dtype(dtype)
  if dtype not in FLOAT_DTYPES:
    raise ValueError(f"dtype={dtype} is not supported for model states; use float32 "
                     "(training) or float64 (parity checks, with jax_enable_x64).")
  if dtype == np.float64 and not x64_enabled():
    raise ValueError("dtype=float64 needs 64-bit JAX: wrap the call in "
                     "`with jax.enable_x64(True):` or set jax.config.update("
                     "'jax_enable_x64', True) before building the model.")
  return dtype


def state_dtype(model: nnx.Module) -> np.dtype:
  """The floating dtype ``model``'s state is held in (float32 or float64)."""
  leaves = jax.tree.leaves(nnx.state(model))
  return np.result_type(*[leaf.dtype for leaf in leaves
                          if jnp.issubdtype(leaf.dtype, jnp.floating)])


def cast_floating(model: nnx.Module, dtype: Any) -> nnx.Module:
  """Casts every floating leaf of ``model``'s state to ``dtype`` in place; returns it."""
  dtype = param_dtype(dtype)
  state = nnx.state(model)

  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  nnx.update(model, jax.tree.map(cast, state))
  return model


def build(module_class: type, config: Any, rngs: Any, dtype: Any = None) -> nnx.Module:
  """``module_class(config, rngs)`` (``rngs`` an ``nnx.Rngs`` or a seed) with its state in
  ``dtype`` (float32 unless asked; float64 needs ``jax_enable_x64``).

  Cast whenever a leaf differs: under x64, flax's initializers make float64 kernels
  while other leaves stay float32, a mixed state that float32 was asked of."""
  model = module_class(config, nnx.Rngs(rngs) if isinstance(rngs, int) else rngs)
  target = param_dtype(dtype)
  if any(jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != target
         for leaf in jax.tree.leaves(nnx.state(model))):
    cast_floating(model, target)
  return model
