"""TensorFlow and tensorflow-datasets: the optional ``imagenet`` extra, imported on demand.

Digits and in-memory arrays need neither; ImageNet (``data.name='imagenet2012'``) and the
fake-ImageNet writer do, and fail with the install command when they are missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_HINT = "pip install 'ofq_jax[imagenet]'"


def require(module: str, *, what: str = "data.name='imagenet2012'") -> ModuleType:
  """Imports ``module`` or raises one line naming the extra that provides it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"error: {what} needs {module.split('.')[0]}, which is not installed; "
                      f"fix: {EXTRA_HINT}") from None


def tensorflow() -> ModuleType:
  """TensorFlow for tf.data only: its GPUs stay hidden so accelerators are JAX's."""
  tf = require("tensorflow")
  tf.config.set_visible_devices([], "GPU")
  return tf
