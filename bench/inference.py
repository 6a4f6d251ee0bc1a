"""Inference throughput and file size: float DeiT vs fake-quant vs packed integer.

  python bench/inference.py --models tiny small --bits 2 --batch 64
  python bench/inference.py --models tiny --bits 4 --json

For each model: the float32 DeiT, the quantized model's fake-quant eval forward
(``matmul='fake'``) and the packed integer model (``ofq_jax.export`` -> ``load_integer``,
integer matmuls), each jitted, timed alternately (median of ``--steps`` calls, compile
excluded) on the same random batch; file sizes of the float32 safetensors state and the
packed file. Weights are random (sizes and speed do not depend on them).

``x fake`` and ``x float`` are the medians of the per-round ratios (each round times every
variant once, back to back), which this noisy 2-core box's drift between rounds does not
move the way it moves a ratio of two medians. ``--host-malloc`` picks glibc's behaviour:
``keep`` (``ofq_jax.host_memory``, as ``python -m ofq_jax.main`` runs its evaluations) or
``default`` (what a process calling ``ofq_jax.export.load_integer`` has unless it opts in).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ofq_jax import export, host_memory
from ofq_jax.models import calibrate, create_model, model_config
from ofq_jax.paths import dotted, state_path


def _forward(model: nnx.Module):
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))
  return lambda images: jitted(state, images)


def _float_file_bytes(model: nnx.Module, directory: str) -> int:
  arrays = {dotted(state_path(p)): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
  path = os.path.join(directory, "float.safetensors")
  save_file(arrays, path)
  return os.path.getsize(path)


def build_variants(name: str, bits: int, images: jax.Array, directory: str
                   ) -> dict[str, tuple[nnx.Module, int | None]]:
  """``variant -> (model, file bytes)``: the float32 DeiT, the quantized model calibrated
  on ``images`` (fake-quant eval) and its packed integer export loaded back."""
  img_size = images.shape[1]
  float_model = create_model(model_config(name, img_size=img_size), 0)
  quant = dict(enabled=True, weight_bits=bits, act_bits=bits)
  fake = create_model(model_config(name, img_size=img_size, quant=quant), 0)
  calibrate(fake, images)
  packed_path = os.path.join(directory, f"{name}_w{bits}a{bits}.safetensors")
  sizes = export.export_integer(fake, packed_path)
  return {"float": (float_model, _float_file_bytes(float_model, directory)),
          "fake-quant": (fake, None),
          "packed integer": (export.load_integer_model(packed_path), sizes["bytes"])}


def bench_model(name: str, bits: int, batch: int, steps: int, directory: str,
                img_size: int = 224) -> list[dict]:
  """One row per variant: median seconds per batch, and the per-round paired ratios."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, img_size, img_size, 3)), jnp.float32)
  variants = {key: (_forward(model), size)
              for key, (model, size) in build_variants(name, bits, images, directory).items()}
  times = {k: [] for k in variants}
  for forward, _ in variants.values():
    jax.block_until_ready(forward(images))  # compile
  for _ in range(steps):
    for key, (forward, _) in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(forward(images))
      times[key].append(time.perf_counter() - start)
  rows = []
  for key, (_, size) in variants.items():
    seconds = float(np.median(times[key]))
    ratio = lambda other: float(np.median(np.asarray(times[other]) / np.asarray(times[key])))
    rows.append(dict(model=name, bits=bits, batch=batch, img_size=img_size, variant=key,
                     images_per_sec=batch / seconds, seconds=seconds,
                     vs_fake=ratio("fake-quant"), vs_float=ratio("float"),
                     file_mb=None if size is None else size / 1e6,
                     device=jax.devices()[0].device_kind))
  return rows


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", choices=("tiny", "small", "base"),
                      default=["tiny", "small"])
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3, help="timed rounds")
  parser.add_argument("--img-size", type=int, default=224)
  parser.add_argument("--host-malloc", choices=("keep", "default"), default="keep",
                      help="keep: reuse freed host memory on CPU (ofq_jax.host_memory, as "
                           "python -m ofq_jax.main does); default: glibc's behaviour")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  kept = args.host_malloc == "keep" and host_memory.keep_freed_memory_on_cpu()
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    for name in args.models:
      rows += bench_model(name, args.bits, args.batch, args.steps, directory, args.img_size)
  for row in rows:
    row["host_malloc"] = "keep" if kept else "default"
  if args.json:
    print(json.dumps(rows))
    return rows
  print(f"{'model':<7}{'bits':>5}{'batch':>6}  {'variant':<15}{'img/s':>9}{'s/batch':>9}"
        f"{'x fake':>8}{'x float':>8}{'file MB':>9}")
  for r in rows:
    size = "" if r["file_mb"] is None else f"{r['file_mb']:.2f}"
    print(f"{r['model']:<7}{r['bits']:>5}{r['batch']:>6}  {r['variant']:<15}"
          f"{r['images_per_sec']:>9.1f}{r['seconds']:>9.3f}{r['vs_fake']:>7.2f}x"
          f"{r['vs_float']:>7.2f}x{size:>9}")
  print(f"host malloc: {rows[0]['host_malloc'] if rows else args.host_malloc}; x fake / "
        "x float: median of the per-round ratios of seconds per batch")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
