"""Times the jitted QAT train step (student + KD teacher), compile excluded.

  python bench/train_step.py --model tiny --bits 2 --batch 8
  python bench/train_step.py --model small --bits 2 --batch 8 --json
  python bench/train_step.py --model tiny --bits 2 --batch 8 --tracking all
  python bench/train_step.py --model small --bits 2 --batch 8 --matmul both --backward bf16
  python bench/train_step.py --model swin_t --bits 2 --batch 8 --matmul both

Prints images/s, step time, achieved FLOP/s (XLA's cost analysis of the compiled
step divided by the step time) and that rate as a fraction of this machine's float32
GEMM rate measured in the same process, compile time, peak RSS and the host memory
newly faulted per step (``--host-malloc``, see ``ofq_jax.host_memory``); ``--json`` prints
one JSON line (the last variant's numbers, and ``variants``: every one). ``--tracking
on`` (default, as the train loop runs) includes the oscillation tracker's update every
step; ``--matmul integer`` runs the quantized matmuls on integer levels
(``ofq_jax.quant.integer``) with ``--operands``, ``--backward`` precision and the
teacher's ``--teacher-precision``; ``both`` times two variants alternately in one process.
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

from ofq_jax import host_memory, losses, optim, sharding
from ofq_jax import step as step_lib
from ofq_jax.models import calibrate, create_model, model_config, swin
from ofq_jax.models.tracker import tracking_config
from ofq_jax.quant import integer


def build(model: str, bits: int, batch: int, attention: str, matmul: str, operands: str,
          backward: str, teacher_precision: str, seed: int = 0):
  quant = dict(enabled=True, weight_bits=bits, act_bits=bits, attention=attention,
               matmul=matmul, matmul_operands=operands, matmul_backward=backward)
  configure = (lambda **kw: swin.model_config("tiny", **kw)) if model == "swin_t" else \
      (lambda **kw: model_config(model, **kw))
  student = create_model(configure(quant=quant), nnx.Rngs(seed))
  teacher = create_model(configure(precision=teacher_precision), nnx.Rngs(seed + 1))
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 224, 224, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, size=(batch,)).astype(np.int32)
  calibrate(student, jnp.asarray(images))
  return student, teacher, {"image": images, "label": labels}


def compile_step(mesh, *, model: str, bits: int, batch: int, attention: str = "qkr",
                 matmul: str = "fake", operands: str = "auto", backward: str = "float32",
                 teacher_precision: str = "highest", tracking: str = "on") -> dict:
  """The training loop's state and step for a random batch, compiled and run once.

  ``tracking``: ``off``, ``integer`` (the integer-level flip definition only) or ``on``
  (both definitions, the train loop's default).
  Returns ``compiled``, ``state``, ``batch``, ``teacher`` (call
  ``compiled(state, batch, teacher)``), XLA's ``flops``, ``compile_seconds`` and an
  empty ``times`` list.
  """
  schedule = optim.epoch_schedule(1000, base_lr=5e-4, epochs=300, warmup_epochs=5)
  loss = losses.stage_loss(distill=True, num_classes=1000)
  student, teacher, host_batch = build(model, bits, batch, attention, matmul, operands,
                                       backward, teacher_precision)
  global_batch = sharding.global_batch(host_batch, mesh)
  tx = optim.adamw(schedule, weight_decay=0.05,
                   mask=optim.weight_decay_mask(nnx.state(student, nnx.Param)))
  placed_teacher = step_lib.place_teacher(teacher, mesh)
  spec = step_lib.create_train_state(student, tx, mesh,
                                     tracking=tracking_config(enabled=tracking != "off",
                                                              fixed_grid=tracking == "on"))
  state = step_lib.initial_state(student, tx, spec)
  step = step_lib.make_train_step(spec, loss, tx, schedule, teacher=placed_teacher)
  start = time.perf_counter()
  compiled = step.lower(state, global_batch, placed_teacher.state).compile()
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  state, metrics = compiled(state, global_batch, placed_teacher.state)  # warm-up
  jax.block_until_ready(metrics)
  host_memory.release_after_first_step(metrics)  # as the train loop does
  return dict(compiled=compiled, state=state, batch=global_batch, teacher=placed_teacher.state,
              flops=flops, compile_seconds=compile_seconds, times=[])


def gemm_rate(size: int = 1024, repeats: int = 5) -> float:
  """This machine's float32 GEMM rate (FLOP/s) at ``precision='highest'``, measured here."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    times.append(time.perf_counter() - start)
  return 2.0 * size ** 3 / float(np.median(times))


def _choices(value: str, both: tuple[str, str]) -> tuple[str, ...]:
  return both if value == "both" else (value,)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=("tiny", "small", "base", "swin_t"), default="tiny",
                      help="DeiT-T / S / B or Swin-T (torchvision's swin_t)")
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--attention", choices=("qkr", "standard"), default="qkr")
  parser.add_argument("--tracking", choices=("on", "off", "integer", "both", "all"),
                      default="on",
                      help="oscillation tracking in the step: on (both flip definitions), "
                           "integer (the integer level only), off; both: off and on, all: "
                           "the three, timed alternately")
  parser.add_argument("--matmul", choices=("fake", "integer", "both"), default="fake",
                      help="model.quant.matmul (both: time each, alternately)")
  parser.add_argument("--operands", choices=integer.OPERANDS, default="auto")
  parser.add_argument("--backward", choices=tuple(integer.BACKWARD_PRECISIONS),
                      default="float32", help="backward matmul precision (integer mode)")
  parser.add_argument("--teacher-precision", choices=("highest", "high", "default"),
                      default="highest")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--host-malloc", choices=("keep", "default"), default="keep",
                      help="keep: reuse freed host memory on CPU (ofq_jax.host_memory, as "
                           "python -m ofq_jax.main does); default: glibc's behaviour")
  args = parser.parse_args(argv)
  if args.host_malloc == "keep":
    host_memory.keep_freed_memory_on_cpu()

  mesh = sharding.make_mesh()
  sharding.check_batch(args.batch, mesh)
  runs = {}
  trackings = ("off", "integer", "on") if args.tracking == "all" else _choices(
      args.tracking, ("off", "on"))
  for tracking in trackings:
    for matmul in _choices(args.matmul, ("fake", "integer")):
      runs[tracking, matmul] = compile_step(
          mesh, model=args.model, bits=args.bits, batch=args.batch, attention=args.attention,
          matmul=matmul, operands=args.operands, backward=args.backward,
          teacher_precision=args.teacher_precision, tracking=tracking)
  for _ in range(args.steps):  # alternate, so every variant sees the same machine state
    for run in runs.values():
      faults = host_memory.page_faults()
      start = time.perf_counter()
      run["state"], metrics = run["compiled"](run["state"], run["batch"], run["teacher"])
      jax.block_until_ready(metrics)
      run["times"].append(time.perf_counter() - start)
      run.setdefault("faults", []).append(host_memory.page_faults() - faults)
  gemm = gemm_rate()
  results = []
  for (tracking, matmul), run in runs.items():
    step_seconds = float(np.median(run["times"]))
    results.append({
        "model": args.model, "bits": args.bits, "batch": args.batch,
        "attention": args.attention, "tracking": tracking, "matmul": matmul,
        "operands": args.operands, "backward": args.backward,
        "teacher_precision": args.teacher_precision,
        "device": jax.devices()[0].device_kind,
        "images_per_sec": args.batch / step_seconds, "step_seconds": step_seconds,
        "flops_per_sec": run["flops"] / step_seconds, "gemm_flops_per_sec": gemm,
        "gemm_fraction": run["flops"] / step_seconds / gemm,
        "compile_seconds": run["compile_seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "faulted_mb_per_step": float(np.median(run["faults"])) * resource.getpagesize() / 2**20,
        "host_malloc": args.host_malloc,
    })
  result = dict(results[-1], variants=results)
  if args.json:
    print(json.dumps(result))
  else:
    _print_table(results)
  return result


def _print_table(results: list[dict]) -> None:
  print(f"{'model':<7}{'bits':>5}{'batch':>6}{'tracking':>9}{'matmul':>9}{'img/s':>9}"
        f"{'step s':>9}{'GFLOP/s':>9}{'of GEMM':>9}{'compile s':>10}{'RSS MB':>8}"
        f"{'faulted MB':>11}")
  for r in results:
    print(f"{r['model']:<7}{r['bits']:>5}{r['batch']:>6}{r['tracking']:>9}{r['matmul']:>9}"
          f"{r['images_per_sec']:>9.2f}{r['step_seconds']:>9.3f}"
          f"{r['flops_per_sec'] / 1e9:>9.1f}{100 * r['gemm_fraction']:>8.1f}%"
          f"{r['compile_seconds']:>10.1f}{r['peak_rss_mb']:>8.0f}"
          f"{r['faulted_mb_per_step']:>11.0f}")
  print(f"float32 GEMM rate here: {results[0]['gemm_flops_per_sec'] / 1e9:.1f} GFLOP/s "
        "(1024^3, precision='highest')")


if __name__ == "__main__":
  main(sys.argv[1:])
