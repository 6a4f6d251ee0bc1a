"""What a compiled step needs per device: XLA's own numbers, read off the executable.

``memory_analysis()`` gives the HBM a device holds (arguments, outputs, the aliasing
that donation saves, temporaries); ``cost_analysis()`` the FLOPs and the bytes the
program moves to and from HBM (XLA:TPU's model, which counts a matmul's operand
re-reads and a softmax's passes); the optimized HLO text lists the collectives.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([0-9,]*)\]")
_LINE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z\-]+)\((.*)$")


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device HBM of a compiled program, in bytes (``memory_analysis()``)."""
  arguments: int
  outputs: int
  aliased: int  # outputs written in place of donated arguments
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of the compiled program: its kind, per-device payload and group."""
  kind: str
  bytes: int  # the larger of what a device sends in and gets back
  groups: str  # replica groups, as XLA prints them
  source: str  # the JAX operation it came from (op_name)


def memory(compiled: Any) -> Memory:
  analysis = compiled.memory_analysis()
  return Memory(int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes),
                int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes),
                int(getattr(analysis, "generated_code_size_in_bytes", 0) or 0))


def cost(compiled: Any) -> dict[str, float]:
  """``{"flops", "bytes"}`` per device, from XLA's cost analysis of the program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  if not analysis:
    raise RuntimeError("XLA gave no cost analysis for this program.")
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes": float(analysis.get("bytes accessed", 0.0))}


def array_bytes(text: str) -> int:
  """Bytes of every array shape written in ``text`` (an HLO type, maybe a tuple)."""
  return sum(_ITEM_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(text))


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective in an optimized HLO module (an async pair counted once, at its
  start), with the payload of its operands or result, whichever is larger."""
  types: dict[str, str] = {}
  found = []
  for line in hlo_text.splitlines():
    match = _LINE.match(line)
    if not match:
      continue
    name = line.split("=", 1)[0].strip().removeprefix("ROOT ").lstrip("%")
    shape, opcode, rest = match.groups()
    types[name] = shape
    kind = opcode.removesuffix("-start")
    if kind not in COLLECTIVES or opcode.endswith("-done"):
      continue
    operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
    sent = sum(array_bytes(types.get(o, "")) for o in operands)
    received = array_bytes(shape) - (sent if opcode.endswith("-start") else 0)
    groups = re.search(r"replica_groups=(.*?)(?:, [a-z_]+=|$)", rest)
    source = re.search(r'op_name="([^"]*)"', rest)
    found.append(Collective(kind, max(sent, received), groups.group(1) if groups else "",
                            source.group(1) if source else ""))
  return found
