"""Where the QAT train step's (or an inference forward's) time goes: every XLA operation,
by kind and by source.

  python bench/profile_step.py --model tiny --bits 2 --batch 8
  python bench/profile_step.py --model small --top 25 --json
  python bench/profile_step.py --model tiny --batch 64 --inference packed

``--inference float|fake|packed`` profiles ``bench/inference.py``'s jitted eval forward of
that variant (float DeiT, fake-quant, packed integer) instead of the train step.

Runs ``bench/train_step.py``'s compiled step (W2A2, KD teacher, tracking on) under
``jax.profiler`` and reads the trace back: each operation the runtime executed (a
"thunk" on CPU: one GEMM, one fusion of elementwise work, one reduction, one copy) is
classed by what its HLO contains, and attributed to the innermost function of the Python
stack that made it (``ofq_jax``, flax or optax) and to the forward pass, the backward
pass or the update. Times are per step (the mean of ``--steps`` traced steps). On CPU,
operations of two threads can overlap, so their sum can exceed the step's wall time;
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0`` gives a serial profile.
The step's host memory newly faulted per step is printed too (``ofq_jax.host_memory``).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inference  # noqa: E402  pylint: disable=wrong-import-position
import train_step  # noqa: E402  pylint: disable=wrong-import-position

from ofq_jax import host_memory, sharding  # noqa: E402  pylint: disable=wrong-import-position

KINDS = ("gemm", "elementwise", "transcendental", "reduction", "copy/transpose", "other")
_TRANSCENDENTAL = {"exponential", "log", "erf", "tanh", "logistic", "power", "sqrt", "rsqrt"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)$")


class HloIndex:
  """Instruction kinds and Python sources from a compiled module's HLO text (``training``:
  a train step, whose operations outside the forward and backward are the update)."""

  def __init__(self, text: str, training: bool = True):
    self.training = training
    self.lines: dict[str, str] = {}
    self.computations: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
      header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
      if header:
        current = header.group(1)
        self.computations[current] = []
      elif line.startswith("}"):
        current = None
      elif current is not None:
        self.computations[current].append(line)
        match = _INSTRUCTION.match(line)
        if match:
          self.lines[match.group(1)] = line
    self.frames = _stack_frames(text)

  def opcodes(self, name: str, depth: int = 0) -> set[str]:
    line = self.lines[name]
    called = re.search(r"calls=%([\w.\-]+)", line)
    if not called or depth > 3:
      return {_INSTRUCTION.match(line).group(2)}
    found = set()
    for inner in self.computations.get(called.group(1), []):
      match = _INSTRUCTION.match(inner)
      if match:
        found |= self.opcodes(match.group(1), depth + 1) if "calls=" in inner \
            else {match.group(2)}
    return found

  def kind(self, name: str) -> str:
    ops = self.opcodes(name) - {"parameter", "constant", "bitcast", "broadcast", "tuple",
                                "get-tuple-element", "reshape"}
    if ops & {"dot", "convolution"} or "__ynn_fusion" in self.lines[name] and "reduce" not in ops:
      return "gemm"
    if ops & {"reduce", "reduce-window"}:
      return "reduction"
    if ops and ops <= {"copy", "transpose", "slice", "concatenate", "pad"}:
      return "copy/transpose"
    if ops & _TRANSCENDENTAL:
      return "transcendental"
    if ops:
      return "elementwise"
    return "other"

  def source(self, name: str) -> tuple[str, str]:
    """``(phase, function)``: forward / backward / update and the innermost function."""
    line = self.lines[name]
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else ""
    phase = "backward" if "transpose(" in op_name else "forward" if (
        "jvp(" in op_name or not self.training) else "update"
    frame = re.search(r"stack_frame_id=(\d+)", line)
    function = self.frames.get(int(frame.group(1)), "?") if frame else "?"
    return phase, function


def _stack_frames(text: str) -> dict[int, str]:
  """Frame id -> ``file:function`` of its innermost location (the HLO's frame tables)."""
  tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
  section = None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    entry = re.match(r"^(\d+) (.*)$", line)
    if section and entry:
      tables[section][int(entry.group(1))] = entry.group(2)
    elif line.startswith(("HloModule", "%", "ENTRY")):
      section = None
  frames = {}
  for frame_id, value in tables["StackFrames"].items():
    location = int(re.search(r"file_location_id=(\d+)", value).group(1))
    loc = tables["FileLocations"][location]
    file_id = int(re.search(r"file_name_id=(\d+)", loc).group(1))
    function_id = int(re.search(r"function_name_id=(\d+)", loc).group(1))
    file_name = os.path.basename(tables["FileNames"][file_id].strip('"'))
    frames[frame_id] = f"{file_name}:{tables['FunctionNames'][function_id].strip(chr(34))}"
  return frames


def trace_durations(directory: str) -> collections.Counter:
  """Total microseconds per event name in the perfetto trace under ``directory``."""
  path = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  durations = collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      durations[event["name"]] += event.get("dur", 0)
  return durations


def _train_step(args):
  """The compiled train step and a function running it once (the state carried along)."""
  mesh = sharding.make_mesh()
  run = train_step.compile_step(mesh, model=args.model, bits=args.bits, batch=args.batch,
                                attention=args.attention, matmul=args.matmul)
  state = [run["state"]]
  def once():
    state[0], metrics = run["compiled"](state[0], run["batch"], run["teacher"])
    jax.block_until_ready(metrics)
  return run["compiled"], once


def _inference(args, directory: str):
  """The compiled eval forward of one ``bench/inference.py`` variant, and a call of it."""
  images = jax.numpy.asarray(np.random.default_rng(0).normal(size=(args.batch, 224, 224, 3)),
                             jax.numpy.float32)
  key = {"float": "float", "fake": "fake-quant", "packed": "packed integer"}[args.inference]
  model, _ = inference.build_variants(args.model, args.bits, images, directory)[key]
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False)).lower(
      state, images).compile()
  return compiled, lambda: jax.block_until_ready(compiled(state, images))


def profile(args) -> dict:
  with tempfile.TemporaryDirectory() as directory:
    compiled, once = (_inference(args, directory) if args.inference
                      else _train_step(args))
  index = HloIndex(compiled.as_text(), training=not args.inference)
  for _ in range(2):  # settle (allocator, caches) before timing
    once()
  faults = host_memory.page_faults()
  start = time.perf_counter()
  for _ in range(args.steps):
    once()
  wall = (time.perf_counter() - start) / args.steps
  faulted_mb = (host_memory.page_faults() - faults) * 4096 / args.steps / 2**20
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(args.steps):
      once()
    jax.profiler.stop_trace()
    durations = trace_durations(directory)
  by_kind, by_source, count = collections.Counter(), collections.Counter(), 0
  for name, micros in durations.items():
    if name not in index.lines:
      continue
    ms = micros / 1e3 / args.steps
    kind = index.kind(name)
    by_kind[kind] += ms
    by_source[(*index.source(name), kind)] += ms
    count += 1
  total = sum(by_kind.values())
  return {
      "model": args.model, "bits": args.bits, "batch": args.batch, "matmul": args.matmul,
      "inference": args.inference,
      "device": jax.devices()[0].device_kind, "step_ms": wall * 1e3,
      "operations_ms": total, "operations": count, "faulted_mb_per_step": faulted_mb,
      "by_kind": {k: by_kind[k] for k in KINDS},
      "top": [dict(phase=p, function=f, kind=k, ms=ms)
              for (p, f, k), ms in by_source.most_common(args.top)],
  }


def _print(result: dict) -> None:
  total = result["operations_ms"]
  what = (f"{result['inference']} inference forward" if result["inference"]
          else f"train step, {result['matmul']} matmul")
  print(f"{result['model']} W{result['bits']}A{result['bits']} batch {result['batch']} "
        f"({what}): {result['step_ms']:.0f} ms wall, operations "
        f"{total:.0f} ms ({result['operations']} distinct operations), host memory faulted "
        f"{result['faulted_mb_per_step']:.0f} MB per step")
  print(f"\n{'kind':<18}{'ms/step':>9}{'share':>8}")
  for kind, ms in result["by_kind"].items():
    print(f"{kind:<18}{ms:>9.1f}{100 * ms / total:>7.1f}%")
  print(f"\n{'phase':<10}{'kind':<16}{'ms/step':>9}{'share':>8}  source")
  for row in result["top"]:
    print(f"{row['phase']:<10}{row['kind']:<16}{row['ms']:>9.1f}"
          f"{100 * row['ms'] / total:>7.1f}%  {row['function']}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=("tiny", "small", "base", "swin_t"), default="tiny")
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--attention", choices=("qkr", "standard"), default="qkr")
  parser.add_argument("--matmul", choices=("fake", "integer"), default="fake")
  parser.add_argument("--inference", choices=("float", "fake", "packed"), default=None,
                      help="profile this variant's eval forward instead of the train step")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=15, help="rows of the by-source table")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  host_memory.keep_freed_memory_on_cpu()
  result = profile(args)
  if args.json:
    print(json.dumps(result))
  else:
    _print(result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
