"""Times the jitted QAT train step (student + KD teacher), compile excluded.

  python bench/train_step.py --model tiny --bits 2 --batch 8
  python bench/train_step.py --model small --bits 2 --batch 8 --json

Prints images/s, step time, achieved FLOP/s (XLA's cost analysis of the compiled
step divided by the step time), compile time and peak RSS; ``--json`` prints one
JSON line with ``images_per_sec``, ``step_seconds``, ``flops_per_sec``,
``compile_seconds``, ``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ofq_jax import optim, sharding, train
from ofq_jax.models import calibrate, create_model, model_config
from ofq_jax.models.quantizers import QuantBuffer


def build(model: str, bits: int, batch: int, attention: str, seed: int = 0):
  quant = dict(enabled=True, weight_bits=bits, act_bits=bits, attention=attention)
  student = create_model(model_config(model, quant=quant), nnx.Rngs(seed))
  teacher = create_model(model_config(model), nnx.Rngs(seed + 1))
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 224, 224, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, size=(batch,)).astype(np.int32)
  calibrate(student, jnp.asarray(images))
  return student, teacher, {"image": images, "label": labels}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=("tiny", "small", "base"), default="tiny")
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--attention", choices=("qkr", "standard"), default="qkr")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)

  mesh = sharding.make_mesh()
  sharding.check_batch(args.batch, mesh)
  student, teacher, host_batch = build(args.model, args.bits, args.batch, args.attention)
  graphdef, params, buffers = nnx.split(student, nnx.Param, QuantBuffer)
  schedule = optim.epoch_schedule(1000, base_lr=5e-4, epochs=300, warmup_epochs=5)
  tx = optim.adamw(schedule, weight_decay=0.05, mask=optim.weight_decay_mask(params))
  replicated = lambda tree: jax.tree.map(lambda _: sharding.replicated(mesh), tree)
  state = {"params": params, "buffers": buffers, "opt_state": tx.init(params),
           "step": jnp.int32(0)}
  state_sh = replicated(state)
  state = jax.device_put(state, state_sh)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  teacher_sh = replicated(teacher_state)
  teacher_state = jax.device_put(teacher_state, teacher_sh)
  step = train.make_train_step(graphdef, tx, schedule, mesh=mesh, state_shardings=state_sh,
                               teacher_graphdef=teacher_graphdef,
                               teacher_shardings=teacher_sh, num_classes=1000)
  batch = sharding.global_batch(host_batch, mesh)

  start = time.perf_counter()
  compiled = step.lower(state, batch, teacher_state).compile()
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  state, metrics = compiled(state, batch, teacher_state)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, teacher_state)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_seconds = float(np.median(times))
  result = {
      "model": args.model, "bits": args.bits, "batch": args.batch,
      "attention": args.attention, "device": jax.devices()[0].device_kind,
      "images_per_sec": args.batch / step_seconds, "step_seconds": step_seconds,
      "flops_per_sec": flops / step_seconds, "compile_seconds": compile_seconds,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
  }
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{'model':<8}{'bits':>5}{'batch':>6}{'img/s':>9}{'step s':>9}{'GFLOP/s':>10}"
          f"{'compile s':>11}{'peak RSS MB':>13}")
    print(f"{args.model:<8}{args.bits:>5}{args.batch:>6}{result['images_per_sec']:>9.2f}"
          f"{step_seconds:>9.3f}{result['flops_per_sec'] / 1e9:>10.1f}"
          f"{compile_seconds:>11.1f}{result['peak_rss_mb']:>13.0f}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
