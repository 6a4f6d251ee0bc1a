"""A roofline estimate of one device's step: the matrix units' time or HBM's, whichever
is longer, from the step's dots (``census``) and XLA's byte count (``program.cost``).

This is a floor, not a forecast: it assumes perfect overlap of compute and memory, no
collective waits, no input stalls, and elementwise work hidden under one of the two. It
ranks configurations and says which resource binds; a measured step will be slower.
"""

from __future__ import annotations

import dataclasses

from ofq_jax.plan.census import KINDS, DotCensus
from ofq_jax.plan.topology import Topology


@dataclasses.dataclass(frozen=True)
class Roofline:
  """One device's step under the roofline model, in seconds."""
  matrix_seconds: float  # every dot at its kind's rate
  memory_seconds: float  # XLA's bytes at HBM bandwidth
  flops: float  # XLA's FLOPs of the device's program

  @property
  def step_seconds(self) -> float:
    return max(self.matrix_seconds, self.memory_seconds)

  @property
  def bound(self) -> str:
    return "memory" if self.memory_seconds >= self.matrix_seconds else "compute"


def roofline(dots: DotCensus, device_flops: float, device_bytes: float, devices: int,
             topology: Topology) -> Roofline:
  """``dots`` of the whole step shared evenly by ``devices``; ``device_flops`` and
  ``device_bytes`` from one device's compiled program."""
  chip = topology.chip
  matrix = sum(chip.dot_seconds(dots.total(kind=kind) / devices, kind) for kind in KINDS)
  matrix *= topology.devices_per_chip  # a device has that share of the chip's units
  memory = device_bytes / topology.per_device(chip.hbm_bandwidth)
  return Roofline(matrix, memory, device_flops)


def utilisation(estimate: Roofline, topology: Topology) -> float:
  """The step's FLOPs over what the device's bf16 peak does in the roofline time."""
  peak = topology.per_device(topology.chip.bf16_flops)
  return estimate.flops / (estimate.step_seconds * peak)
