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
f = jax.jit(lambda v: jnp.cumsum(jnp.sin(v), axis=0)[-1].sum())  # a 64 MB temporary
def call():
  f(x).block_until_ready()
  time.sleep(0.02)  # the temporary is freed just after the result is ready
for _ in range(2):
  call()
faulted = []
for _ in range(8):
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
  """Each call's 64 MB temporary is freed and allocated again: with the setting it comes
  back from the heap (no new pages); glibc's default maps (and zero-fills) it anew."""
  kept = _faulted_mb_per_call("keep")
  default = _faulted_mb_per_call("default")
  assert kept < 8, f"{kept:.1f} MB of new pages in the median call with keep_freed_memory()"
  assert kept < default


def test_opt_out_and_platform_detection(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.cpu_only()
  assert not host_memory.keep_freed_memory_on_cpu()  # accelerator runs are left alone
  monkeypatch.setattr(host_memory, "_applied", False)
  monkeypatch.setenv(host_memory.OPT_OUT_ENV, "default")
  assert not host_memory.keep_freed_memory()
