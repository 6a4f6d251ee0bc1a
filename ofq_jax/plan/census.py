"""Every dot of a step, by the arithmetic it runs in: the program as traced (its jaxpr).

A dot's FLOPs are exact from its shapes, and its kind says which units do them: ``int8``
(the integer matmuls, int32 sums), ``bf16``, or float32 at its precision (``f32
default`` is one bf16 pass on a TPU, ``high`` three, ``highest`` six). Dots traced
under ``jax.named_scope("teacher")`` (``step.make_train_step``) are the KD teacher's;
the rest are the student's forward, backward and update.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.extend import core as jax_core

from ofq_jax.step import TEACHER_SCOPE

KINDS = ("int8", "bf16", "f32 default", "f32 high", "f32 highest", "f64")


@dataclasses.dataclass(frozen=True)
class DotCensus:
  """FLOPs per (owner, kind) over one whole step (all devices, the global batch)."""
  flops: dict[tuple[str, str], float]  # ("student" | "teacher", kind) -> FLOPs
  counts: dict[tuple[str, str], int]  # how many dot_generals

  def total(self, owner: str | None = None, kind: str | None = None) -> float:
    return sum(v for (o, k), v in self.flops.items()
               if (owner is None or o == owner) and (kind is None or k == kind))

  def share(self, kind: str, owner: str = "student") -> float:
    """The share of ``owner``'s dot FLOPs that run as ``kind``."""
    total = self.total(owner)
    return self.total(owner, kind) / total if total else 0.0


def dot_kind(lhs: np.dtype, rhs: np.dtype, precision: Any) -> str:
  """``KINDS`` entry of a dot_general with these operand dtypes and ``precision``."""
  dtypes = {np.dtype(lhs), np.dtype(rhs)}
  if dtypes <= {np.dtype(np.int8), np.dtype(np.uint8)}:
    return "int8"
  if np.dtype(np.float64) in dtypes:
    return "f64"
  if dtypes <= {np.dtype(jax.numpy.bfloat16)}:
    return "bf16"
  levels = precision if isinstance(precision, tuple) else (precision,)
  names = {str(p).rsplit(".", 1)[-1].lower() for p in levels if p is not None}
  if "highest" in names:
    return "f32 highest"
  if "high" in names:
    return "f32 high"
  return "f32 default"


def dot_flops(lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], dimension_numbers
              ) -> float:
  """``2 * batch * M * N * K`` of a dot_general."""
  (contract, _), (batch, _) = dimension_numbers
  rhs_contract, rhs_batch = dimension_numbers[0][1], dimension_numbers[1][1]
  k = math.prod(lhs_shape[d] for d in contract)
  b = math.prod(lhs_shape[d] for d in batch)
  m = math.prod(s for d, s in enumerate(lhs_shape) if d not in contract and d not in batch)
  n = math.prod(s for d, s in enumerate(rhs_shape)
                if d not in rhs_contract and d not in rhs_batch)
  return 2.0 * b * m * n * k


def census(jaxpr: jax_core.Jaxpr) -> DotCensus:
  """The dots of ``jaxpr`` (e.g. ``jax.jit(f).trace(*args).jaxpr.jaxpr``), counted
  through every nested program; a scan's body counts ``length`` times, a cond's
  costliest branch once."""
  flops: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  _walk(jaxpr, 1.0, flops, counts)
  return DotCensus(dict(flops), dict(counts))


def _walk(jaxpr, times: float, flops, counts) -> None:
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval for v in eqn.invars)
      owner = "teacher" if TEACHER_SCOPE in str(eqn.source_info.name_stack) else "student"
      key = (owner, dot_kind(lhs.dtype, rhs.dtype, eqn.params.get("precision")))
      flops[key] += times * dot_flops(lhs.shape, rhs.shape, eqn.params["dimension_numbers"])
      counts[key] += 1
      continue
    if name == "cond":
      _costliest_branch(eqn.params["branches"], times, flops, counts)
      continue
    inner = times * (eqn.params["length"] if name == "scan" else 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          _walk(sub.jaxpr, inner, flops, counts)
        elif isinstance(sub, jax_core.Jaxpr):
          _walk(sub, inner, flops, counts)


def _costliest_branch(branches, times: float, flops, counts) -> None:
  found = []
  for branch in branches:
    f, c = collections.Counter(), collections.Counter()
    _walk(branch.jaxpr, times, f, c)
    found.append((sum(f.values()), f, c))
  _, f, c = max(found, key=lambda x: x[0])
  flops.update(f)
  counts.update(c)
