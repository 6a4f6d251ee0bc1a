"""The platform a program is built for: where it runs, or the chip a plan compiles for.

``jax.default_backend()`` names where this process's arrays live. A plan
(``ofq_jax.plan``) traces and compiles on a CPU host for a TPU it has never seen, so
every choice that depends on the platform (the integer matmuls' operand dtype,
``quant.matmul='auto'``, scanning the blocks) reads ``platform()`` instead, which a plan
sets with ``compiling_for``.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator

import jax

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ofq_jax_target_platform", default=None)


def platform() -> str:
  """``'cpu'``, ``'gpu'`` or ``'tpu'``: what the program being traced will run on."""
  name = _PLATFORM.get() or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


@contextlib.contextmanager
def compiling_for(name: str) -> Iterator[None]:
  """Within this block, programs are traced for ``name`` (``'tpu'``, ``'gpu'``, ``'cpu'``)."""
  token = _PLATFORM.set(name)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def skip_absent_tpu() -> None:
  """Keeps JAX from probing for TPU chips a host does not have.

  With libtpu installed (the ``tpu`` extra, which the test extra includes, for plans) on
  a CPU host, JAX's first use tries the TPU backend and libtpu prints a screen of errors
  before JAX falls back to the CPU. A TPU VM has ``/dev/accel*`` (``/dev/vfio`` on v5p);
  without them, and without a GPU plugin or a ``JAX_PLATFORMS`` of the user's, the
  platforms are just the CPU. Call before JAX's first use (the command lines do)."""
  if (os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None
      or tpu_chips_present()):
    return
  plugins = [d.metadata["Name"] for d in importlib.metadata.distributions()
             if (d.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax-rocm"))]
  if not plugins:
    jax.config.update("jax_platforms", "cpu")


def tpu_chips_present() -> bool:
  """Whether this host has TPU chips: ``/dev/accel*`` (v4, v5e, v6e) or ``/dev/vfio``
  devices (v5p)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
