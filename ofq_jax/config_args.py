"""Typed big_vision-style argument strings of config files: ``--config=FILE:bits=4,seed=1``."""

from __future__ import annotations

from typing import Any

from ofq_jax.errors import UserError


def parse_arg(arg: str | None, *, where: str, **fields: Any) -> dict[str, Any]:
  """``"bits=4,seed=1"`` -> ``{"bits": 4, "seed": 1, ...}`` with every field filled.

  Each keyword names a field: a tuple is its choices (the first is the default,
  the string is converted with the first choice's type), anything else is the
  default whose type converts the string. A bad key or value fails in one line
  naming ``where``, the value and the known keys.
  """
  known = ", ".join(fields)
  values: dict[str, Any] = {k: (v[0] if isinstance(v, tuple) else v) for k, v in fields.items()}
  for pair in [p.strip() for p in (arg or "").split(",") if p.strip()]:
    key, sep, text = (s.strip() for s in pair.partition("="))
    if not sep:
      raise UserError(f"{where}: argument {pair!r} is not key=value (known: {known})")
    if key not in fields:
      raise UserError(f"{where}: unknown argument {key!r} (known: {known})")
    spec = fields[key]
    kind = type(spec[0] if isinstance(spec, tuple) else spec)
    try:
      value = kind(text)
    except ValueError:
      raise UserError(f"{where}: {key}={text!r} is not a{'n' if kind is int else ''} "
                       f"{kind.__name__} (known: {known})") from None
    if isinstance(spec, tuple) and value not in spec:
      raise UserError(f"{where}: {key}={text!r} is not one of "
                       f"{', '.join(map(str, spec))} (known: {known})")
    values[key] = value
  return values
