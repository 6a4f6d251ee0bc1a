"""host_memory: freed host memory is reused instead of re-faulted (measured, in subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ofq_jax import host_memory

SCRIPT = """
import sys
from ofq_jax import host_memory
if sys.argv[1] == "keep":
  assert host_memory.keep_freed_memory()
import time
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024), jnp.float32)  # 64 MB: above glibc's largest mmap threshold
# A gradient, as a train step is: its 64 MB output and temporaries are freed after each
# call. (A forward-only cumsum's 64 MB temporary was re-faulted on jax 0.10 but not 0.11.)
f = jax.jit(jax.grad(lambda v: jnp.sum(jnp.tanh(jnp.sin(v) * v) ** 2)))
def call():
  jax.block_until_ready(f(x))
  time.sleep(0.1)  # the temporaries are freed just after the result is ready
for _ in range(8):  # the heap grows until it holds free blocks (more calls under load)
  call()
faulted = []
for _ in range(12):
  before = host_memory.page_faults()
  call()
  faulted.append((host_memory.page_faults() - before) * 4096 / 2**20)
print(sorted(faulted)[len(faulted) // 2])  # the median call
"""


def _faulted_mb_per_call(mode: str) -> float:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(host_memory.OPT_OUT_ENV, None)
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, check=True,
                       capture_output=True, text=True, timeout=120)
  return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_reused_output_blocks_are_not_faulted_again():
  """Each call's 64 MB blocks are freed and allocated again: with the setting they come
  back from the heap (no new pages); glibc's default maps (and zero-fills) them anew.

  The heap first grows until freed blocks are there for the next call: on a loaded box
  (CI, the other xdist worker training) a late free made 4 calls in a row fault 64 MB
  after 2 or 4 warm-up calls (one CI run failed so; 3 busy processes beside it reproduce
  it), so 8 warm-up calls come first."""
  kept = _faulted_mb_per_call("keep")
  default = _faulted_mb_per_call("default")
  assert kept < 8, f"{kept:.1f} MB of new pages in the median call with keep_freed_memory()"
  assert default > 32, f"glibc's default re-faulted only {default:.1f} MB: the workload no " \
                       "longer exercises the setting"


LARGE_BLOCK = """
import ctypes, ctypes.util, sys
from ofq_jax import host_memory
assert host_memory.keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 2**31 + 2**27  # 2.125 GiB: over the largest positive int glibc's mallopt takes
faulted = []
for _ in range(2):
  before = host_memory.page_faults()
  block = libc.malloc(size)
  assert block
  libc.memset(block, 1, size)
  libc.free(block)
  faulted.append((host_memory.page_faults() - before) * 4096 / 2**20)
print(faulted[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_blocks_over_two_gib_are_kept_too():
  """A freed 2.1 GiB block comes back without new pages (trimming is off, not just set to
  the largest positive int, which gave such blocks back to the kernel every time)."""
  out = subprocess.run([sys.executable, "-c", LARGE_BLOCK], check=True, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert float(out.stdout.strip().splitlines()[-1]) < 8


RELEASES = """
import ctypes, ctypes.util
from ofq_jax import host_memory
def rss_mb():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def freed_block(mb):  # touched, then freed: kept resident under keep_freed_memory
  pin = libc.malloc(1 << 20)  # so that the block is not the heap's top
  block = libc.malloc(mb << 20)
  after = libc.malloc(1 << 20)
  libc.memset(block, 1, mb << 20)
  libc.free(block)
  return pin, after
import jax, jax.numpy as jnp
out = jnp.ones(4)
assert not host_memory.release_after_first_step(out)  # malloc untouched: nothing to do
assert host_memory.keep_freed_memory()
trims = []
real = host_memory._trim
host_memory._trim = lambda pad: trims.append(pad) or real(pad)
host_memory.RELEASE_AFTER_COMPILE_S = 0.0
jax.jit(lambda x: jnp.sin(x) * 3).lower(out).compile()
compiled_trims = len(trims)
freed_block(256)
before = rss_mb()
assert host_memory.release_after_first_step(out)
print(compiled_trims, before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_released_after_compiles_and_first_steps():
  """Under keep_freed_memory a freed 256 MB block in the middle of the heap stays resident;
  ``release_after_first_step`` gives its pages back (RSS drops by most of it), and a
  compilation triggers the same release. Without the setting it does nothing."""
  out = subprocess.run([sys.executable, "-c", RELEASES], check=True, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  compiled_trims, released_mb = out.stdout.split()
  assert int(compiled_trims) >= 1
  assert float(released_mb) > 200, released_mb


def test_opt_out_and_platform_detection(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.cpu_only()
  assert not host_memory.keep_freed_memory_on_cpu()  # accelerator runs are left alone
  monkeypatch.setattr(host_memory, "_applied", False)
  monkeypatch.setenv(host_memory.OPT_OUT_ENV, "default")
  assert not host_memory.keep_freed_memory()
