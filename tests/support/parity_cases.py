"""What a ``quantizers_*`` fixture holds: its StatsQ bit-widths, LSQ cases and CGA masks.

Read from the file's keys (fixtures README), so both parity tiers test every
case a generator wrote, whatever its bit-widths.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# LSQ layouts of the reference (fixtures README): the axes that index the step.
_LSQ_LAYOUTS = {
    "lsq3d": (1,),  # LsqQuantizer on (B, N, C): per token
    "lsq4v": (2,),  # LsqQuantizer4v: per last-axis channel
    "lsq4d": (2,),  # per query row of (B, H, N, N) softmax probabilities
}


@dataclasses.dataclass(frozen=True)
class LsqCase:
  prefix: str  # e.g. "lsq3d/b2/s/"
  bits: int
  signed: bool
  keep_axes: tuple[int, ...]

  @property
  def init_factor(self) -> float:
    return 2.0 if self.signed else 4.0


def statsq_bits(arrays: dict[str, np.ndarray]) -> list[int]:
  return sorted(int(m.group(1)) for k in arrays
                if (m := re.fullmatch(r"statsq/b(\d+)/w", k)))


def lsq_cases(arrays: dict[str, np.ndarray]) -> list[LsqCase]:
  cases = []
  for key in sorted(arrays):
    m = re.fullmatch(r"(lsq\w+)/b(\d+)/(?:([su])/)?x", key)
    if m:
      layout, bits, sign = m.groups()
      # lsq4v is signed (no sign folder); the others say s / u.
      cases.append(LsqCase(key[:-1], int(bits), sign != "u", _LSQ_LAYOUTS[layout]))
  return cases


def cga_cases(arrays: dict[str, np.ndarray]) -> list[tuple[str, int, float]]:
  """``(prefix, bits, boundary_range)`` of every CGA mask in the file."""
  return [(key[:-1], int(m.group(1)), float(m.group(2))) for key in sorted(arrays)
          if (m := re.fullmatch(r"cga/b(\d+)/br([\d.]+)/w", key))]
