"""The accelerators a plan can compile for, with the public figures its estimates use.

Sources (Google Cloud TPU system-architecture pages, read 2026-12):
  v4   https://cloud.google.com/tpu/docs/v4  : 275 TFLOP/s bf16 or int8, 32 GiB HBM2 at
       1200 GB/s, 4 chips per host (two TensorCores per chip, one JAX device).
  v5e  https://cloud.google.com/tpu/docs/v5e : 197 TFLOP/s bf16, 393 TOP/s int8, 16 GB
       HBM2 at 819 GB/s, 8 chips per host.
  v5p  https://cloud.google.com/tpu/docs/v5p : 459 TFLOP/s bf16, 918 TOP/s int8 (twice
       bf16, as on every chip since v5), 95 GB HBM2e at 2765 GB/s, 4 chips per host.
  v6e  https://cloud.google.com/tpu/docs/v6e : 918 TFLOP/s bf16, 1836 TOP/s int8, 32 GB
       HBM at 1638 GB/s, 8 chips per host.
A program may use less than the published capacity: ``usable_hbm`` is what libtpu
0.0.42 allows one device (read off its refusal, "exceeds available HBM (15.75G)", for a
program too large; ``tests/unit/plan`` checks it), and what "fits" is judged against.
v4 compiles one device per TensorCore (two a chip, 15.25 GiB each).
"""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's peak rates and memory, per chip (one JAX device)."""
  name: str  # the topology prefix: "v5e"
  device_kind: str  # what a compile-only device of it reports
  bf16_flops: float  # peak bf16 FLOP/s (float32 at 'default' precision runs at it)
  int8_ops: float  # peak int8 OP/s
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  chips_per_host: int
  usable_hbm: int  # per device, as libtpu allows a program
  source: str

  def dot_seconds(self, flops: float, kind: str) -> float:
    """Seconds the matrix units need for ``flops`` of one dot kind (``dots.KINDS``)."""
    if kind == "int8":
      return flops / self.int8_ops
    return flops * BF16_PASSES[kind] / self.bf16_flops


BF16_PASSES = {"bf16": 1, "f32 default": 1, "f32 high": 3, "f32 highest": 6, "f64": 6}
"""bf16 MXU passes per dot by operand kind: float32 at 'default' is one bf16 pass, at
'high' (bf16x3) three, at 'highest' six (XLA:TPU's float32 decomposition). float64 has no
matrix unit; six passes is a floor, not an estimate."""

CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "TPU v4", 275e12, 275e12, 32 * GIB, 1200e9, 4, int(15.25 * GIB),
         "https://cloud.google.com/tpu/docs/v4"),
    Chip("v5e", "TPU v5 lite", 197e12, 393e12, 16 * GIB, 819e9, 8, int(15.75 * GIB),
         "https://cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", 459e12, 918e12, 95 * GIB, 2765e9, 4, int(95.74 * GIB),
         "https://cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", "TPU v6 lite", 918e12, 1836e12, 32 * GIB, 1638e9, 8, int(31.25 * GIB),
         "https://cloud.google.com/tpu/docs/v6e"),
)}
