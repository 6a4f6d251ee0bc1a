"""Small shape and validation helpers shared by the quantizers."""

from __future__ import annotations

from ofq_jax.errors import UserError


def check_bits(bits: int, *, what: str) -> int:
  """Validates a bit-width for the quantizers here (2 to 8 bits)."""
  if isinstance(bits, bool) or not isinstance(bits, (int,)) or not 2 <= bits <= 8:
    raise UserError(
        f"Unsupported {what} bit-width {bits!r}: ofq_jax quantizes with 2 to 8 "
        "bits (the reference's 1-bit sign paths are unused). Use an integer in "
        "[2, 8], or mark the layer float in quant.rules.")
  return int(bits)


def keep_axes_shape(shape: tuple[int, ...], keep_axes: tuple[int, ...]) -> tuple[int, ...]:
  """Shape that broadcasts a per-``keep_axes`` statistic against ``shape``."""
  ndim = len(shape)
  keep = {a % ndim for a in keep_axes}
  return tuple(shape[a] if a in keep else 1 for a in range(ndim))


def reduce_axes_for(ndim: int, keep_axes: tuple[int, ...]) -> tuple[int, ...]:
  """The axes that share one statistic: all axes not in ``keep_axes``."""
  keep = {a % ndim for a in keep_axes}
  return tuple(a for a in range(ndim) if a not in keep)

