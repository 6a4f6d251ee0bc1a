"""bench/profile_step.py's reading of HLO and traces, on a small function whose ops are known."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from support import load_bench

profile_step = load_bench("profile_step")


def matmul_then_sine(w, x):
  return jnp.sum(jnp.sin(jnp.matmul(x, w, precision="highest")))


def test_operations_are_classed_and_attributed_to_their_function():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
  step = jax.jit(jax.grad(matmul_then_sine))
  compiled = step.lower(w, x).compile()
  index = profile_step.HloIndex(compiled.as_text())
  rows = [(index.kind(n), *index.source(n)) for n in index.lines
          if index.source(n)[1].endswith("matmul_then_sine")]
  kinds = {(kind, phase) for kind, phase, _ in rows}
  assert ("gemm", "forward") in kinds and ("gemm", "backward") in kinds, rows
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(3):
      jax.block_until_ready(compiled(w, x))
    jax.profiler.stop_trace()
    durations = profile_step.trace_durations(directory)
  traced = [name for name in durations if name in index.lines]
  assert traced and all(durations[name] > 0 for name in traced)
  assert any(index.kind(name) == "gemm" for name in traced)


def test_an_inference_forward_is_all_forward():
  """``--inference``: without a backward pass, no operation is classed as the update."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
  compiled = jax.jit(matmul_then_sine).lower(w, x).compile()
  index = profile_step.HloIndex(compiled.as_text(), training=False)
  phases = {index.source(n)[0] for n in index.lines
            if index.source(n)[1].endswith("matmul_then_sine")}
  assert phases == {"forward"}
  as_train_step = profile_step.HloIndex(compiled.as_text())
  assert {as_train_step.source(n)[0] for n in as_train_step.lines
          if as_train_step.source(n)[1].endswith("matmul_then_sine")} == {"update"}
