"""The one place that knows how the supported jax / flax / orbax versions differ.

Supported: jax 0.10 (Python 3.11, what CI tests) through 0.12 (Python 3.12), with the
flax, optax and orbax releases that pair with them (docs/install.md). Everything
else in ofq_jax uses APIs common to all of them; the differences are here.
"""

from __future__ import annotations

import importlib.metadata
import re

FIRST_FLAX_FOR_NEW_JAX = (0, 12, 9)
"""flax 0.12.8 subclasses ``jax.experimental.hijax.HiPrimitive``, renamed in jax 0.11.2."""
JAX_THAT_BREAKS_OLD_FLAX = (0, 11, 2)


def _version(package: str) -> tuple[int, ...]:
  text = importlib.metadata.version(package)
  return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_versions() -> None:
  """Fails with the fix before an incompatible flax fails with a bare AttributeError."""
  try:
    jax_version, flax_version = _version("jax"), _version("flax")
  except importlib.metadata.PackageNotFoundError:
    return  # a source checkout without metadata: nothing to compare
  if jax_version >= JAX_THAT_BREAKS_OLD_FLAX and flax_version < FIRST_FLAX_FOR_NEW_JAX:
    have = ".".join(map(str, flax_version))
    raise ImportError(
        f"error: flax {have} does not work with jax {'.'.join(map(str, jax_version))} "
        "(flax < 0.12.9 uses a jax API renamed in 0.11.2); fix: pip install "
        "'flax>=0.12.9,<0.13' (needs Python 3.12), or keep jax < 0.11.2.")


def x64_enabled() -> bool:
  """Whether ``jax_enable_x64`` is on (attribute read: ``config.read`` is going away)."""
  import jax  # pylint: disable=import-outside-toplevel
  return bool(jax.config.jax_enable_x64)


def to_shape_dtype_struct(x):
  """orbax's ShapeDtypeStruct-with-sharding of an array (``ocp.utils`` is deprecated)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree = getattr(ocp, "tree", None)
  convert = getattr(tree, "to_shape_dtype_struct", None) or ocp.utils.to_shape_dtype_struct
  return convert(x)
