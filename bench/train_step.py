"""Times the jitted QAT train step (student + KD teacher), compile excluded.

  python bench/train_step.py --model tiny --bits 2 --batch 8
  python bench/train_step.py --model small --bits 2 --batch 8 --json
  python bench/train_step.py --model tiny --bits 2 --batch 8 --tracking both

Prints images/s, step time, achieved FLOP/s (XLA's cost analysis of the compiled
step divided by the step time), compile time and peak RSS; ``--json`` prints one
JSON line with ``images_per_sec``, ``step_seconds``, ``flops_per_sec``,
``compile_seconds``, ``peak_rss_mb``. ``--tracking on`` (default, as the train loop runs)
includes the oscillation tracker's update every step; ``off`` leaves it out; ``both``
times the two alternately in one process and prints the overhead.
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

from ofq_jax import losses, optim, sharding
from ofq_jax import step as step_lib
from ofq_jax.models import calibrate, create_model, model_config
from ofq_jax.models.tracker import tracking_config


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
  parser.add_argument("--tracking", choices=("on", "off", "both"), default="on",
                      help="oscillation tracking in the step (both: time each, alternately)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)

  mesh = sharding.make_mesh()
  sharding.check_batch(args.batch, mesh)
  student, teacher, host_batch = build(args.model, args.bits, args.batch, args.attention)
  schedule = optim.epoch_schedule(1000, base_lr=5e-4, epochs=300, warmup_epochs=5)
  tx = optim.adamw(schedule, weight_decay=0.05,
                   mask=optim.weight_decay_mask(nnx.state(student, nnx.Param)))
  placed_teacher = step_lib.place_teacher(teacher, mesh)
  teacher_state = placed_teacher.state
  batch = sharding.global_batch(host_batch, mesh)
  loss = losses.stage_loss(distill=True, num_classes=1000)
  variants = ("off", "on") if args.tracking == "both" else (args.tracking,)
  runs = {}
  for variant in variants:  # the state and step the training loop builds
    spec = step_lib.create_train_state(student, tx, mesh,
                                       tracking=tracking_config(enabled=variant == "on"))
    run_state = step_lib.initial_state(student, tx, spec)
    step = step_lib.make_train_step(spec, loss, tx, schedule, teacher=placed_teacher)
    start = time.perf_counter()
    compiled = step.lower(run_state, batch, teacher_state).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    run_state, metrics = compiled(run_state, batch, teacher_state)  # warm-up
    jax.block_until_ready(metrics)
    runs[variant] = dict(compiled=compiled, state=run_state, flops=flops,
                         compile_seconds=compile_seconds, times=[])
  for _ in range(args.steps):  # alternate, so both see the same machine state
    for variant in variants:
      run = runs[variant]
      start = time.perf_counter()
      run["state"], metrics = run["compiled"](run["state"], batch, teacher_state)
      jax.block_until_ready(metrics)
      run["times"].append(time.perf_counter() - start)
  results = []
  for variant in variants:
    run = runs[variant]
    step_seconds = float(np.median(run["times"]))
    results.append({
        "model": args.model, "bits": args.bits, "batch": args.batch,
        "attention": args.attention, "tracking": variant,
        "device": jax.devices()[0].device_kind,
        "images_per_sec": args.batch / step_seconds, "step_seconds": step_seconds,
        "flops_per_sec": run["flops"] / step_seconds,
        "compile_seconds": run["compile_seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    })
  result = results[-1]
  if len(results) == 2:
    result = dict(result, tracking_overhead=results[1]["step_seconds"] /
                  results[0]["step_seconds"] - 1.0)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{'model':<8}{'bits':>5}{'batch':>6}{'tracking':>9}{'img/s':>9}{'step s':>9}"
          f"{'GFLOP/s':>10}{'compile s':>11}{'peak RSS MB':>13}")
    for r in results:
      print(f"{args.model:<8}{args.bits:>5}{args.batch:>6}{r['tracking']:>9}"
            f"{r['images_per_sec']:>9.2f}{r['step_seconds']:>9.3f}"
            f"{r['flops_per_sec'] / 1e9:>10.1f}{r['compile_seconds']:>11.1f}"
            f"{r['peak_rss_mb']:>13.0f}")
    if "tracking_overhead" in result:
      print(f"tracking overhead: {100 * result['tracking_overhead']:+.1f} % step time")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
