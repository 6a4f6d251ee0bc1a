"""Keeps freed host memory for reuse, so XLA:CPU does not re-fault its buffers every step.

XLA:CPU allocates an execution's temporaries as one block (848 MB for the DeiT-T W2A2
batch-8 train step) and frees it afterwards. glibc serves blocks that large with a
fresh ``mmap`` (a worker thread's arena always does, whatever ``M_MMAP_MAX`` says), so
every step zero-fills ~860 MB of new pages: 0.4 CPU-seconds per step, a fifth of the
step's CPU time on a 2-core box (``bench/train_step.py`` prints the page faults). One
malloc arena, no ``mmap`` and no trimming make glibc hand the same block back instead.

Kept memory has a cost: what the XLA compiler frees (gigabytes for a large program) stays
resident, and so does the first call's temporary block, which the second call does not
reuse (Swin-T W2A2 at batch 8: 9.8 GB peak RSS, against 7.1 GB with glibc's defaults and
7.0-7.3 GB for the PyTorch reference). So the free pages go back to the kernel
(``malloc_trim``) after every compilation longer than ``RELEASE_AFTER_COMPILE_S`` and once
after a step program's first call (``release_after_first_step``: the train loop, the
bench): 5.9 GB peak, still ~0 MB faulted per step (BENCHMARKS.md).

Applied by ``python -m ofq_jax.main`` and the ``bench/`` scripts to CPU-only runs,
before jax starts its threads; a notebook calls ``keep_freed_memory()`` in its first
cell. ``OFQ_JAX_HOST_MALLOC=default`` leaves malloc alone. Runs with an accelerator
are left alone too: their host does little but feed input, where one arena could slow a
many-threaded input pipeline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil
import resource
import time
from typing import Any

OPT_OUT_ENV = "OFQ_JAX_HOST_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters
_NEVER_TRIM = -1
"""glibc stores mallopt's int as a size_t: -1 is SIZE_MAX, never trim. The largest positive
int (2**31 - 1) still gave back any freed block over 2 GiB: Swin-T's 3.2 GB step buffer
(W2A2, batch 8) was re-faulted every step."""
_applied = False
RELEASE_AFTER_COMPILE_S = 1.0
"""Compilations shorter than this leave little behind; a trim of a large heap costs
0.1-0.5 s, so small programs (eval metrics, init) do not pay it."""
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax's dispatch.py
_trim = None  # glibc's malloc_trim, once keep_freed_memory applied (and the listener set)
_TEMPORARIES_FREED_S = 0.05
"""XLA:CPU frees an execution's temporaries just after its outputs are ready."""


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed memory; True when applied (glibc only).

  Call before the first jax computation: threads that already allocated keep their
  own arenas (and their per-step ``mmap``).
  """
  global _applied
  if _applied:
    return True
  if os.environ.get(OPT_OUT_ENV, "").lower() == "default":
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
    gnu = libc.gnu_get_libc_version  # only glibc has both
  except (OSError, AttributeError, TypeError):
    return False
  del gnu
  ok = all(mallopt(param, value) == 1 for param, value in
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
  _applied = ok
  if ok:
    _release_after_compiles(libc)
  return ok


def _release_after_compiles(libc: ctypes.CDLL) -> None:
  """Registers (once) a jax listener that trims the heap after each long compilation."""
  global _trim
  if _trim is not None:
    return
  _trim = libc.malloc_trim
  import jax  # pylint: disable=import-outside-toplevel  (no backend starts here)

  def release(event: str, duration: float, **_) -> None:
    if event == _BACKEND_COMPILE_EVENT and duration >= RELEASE_AFTER_COMPILE_S:
      _trim(0)

  jax.monitoring.register_event_duration_secs_listener(release)


def release_after_first_step(outputs: Any) -> bool:
  """Once a new step program's first call is done (``outputs`` ready), hands the free
  pages back to the kernel; True when done (only where ``keep_freed_memory`` applied).

  The first and second calls' temporaries do not share one block (Swin-T W2A2 at batch 8:
  two 3.2 GB blocks, both kept resident from then on); released once after the first
  call, every later call reuses one block and faults nothing."""
  if _trim is None:
    return False
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(outputs)
  time.sleep(_TEMPORARIES_FREED_S)
  return bool(_trim(0))


def cpu_only() -> bool:
  """Whether jax will run on the CPU alone, decided without starting a backend.

  ``JAX_PLATFORMS`` (or ``jax.config.jax_platforms``) decides when set; otherwise any
  installed accelerator plugin (CUDA, ROCm, TPU) means an accelerator may be used.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if not platforms:
    import jax  # pylint: disable=import-outside-toplevel
    platforms = jax.config.jax_platforms or ""
  if platforms:
    return {p.strip().lower() for p in platforms.split(",") if p.strip()} == {"cpu"}
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return False
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if importlib.util.find_spec("jax_plugins") is None:  # the namespace CUDA/ROCm plugins use
    return True
  import jax_plugins  # pylint: disable=import-outside-toplevel
  return not list(pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_memory_on_cpu() -> bool:
  """``keep_freed_memory()`` for CPU-only runs; False (and nothing changed) otherwise."""
  return cpu_only() and keep_freed_memory()


def page_faults() -> int:
  """This process's minor page faults so far (new pages the kernel zero-filled)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
