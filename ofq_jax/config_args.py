"""The big_vision-style argument string of config files: ``--config=FILE:bits=4,seed=1``."""

from __future__ import annotations

from collections.abc import Iterable


def parse_config_arg(arg: str | None, known: Iterable[str]) -> dict[str, str]:
  """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}``; unknown keys are an error naming them."""
  known = tuple(known)
  parsed = {}
  for pair in [p for p in (arg or "").split(",") if p.strip()]:
    if "=" not in pair:
      raise ValueError(f"Config argument {pair!r} is not key=value (known keys: "
                       f"{', '.join(known)}).")
    key, value = pair.split("=", 1)
    parsed[key.strip()] = value.strip()
  unknown = sorted(set(parsed) - set(known))
  if unknown:
    raise ValueError(f"Unknown config argument(s) {unknown}; known: {', '.join(known)}.")
  return parsed
