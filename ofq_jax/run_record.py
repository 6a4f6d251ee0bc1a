"""``workdir/run.json``: the resolved config of the run a workdir holds.

Checkpoints resume automatically, so rerunning in a workdir with another learning
rate would silently continue a different run. The first start writes the resolved
config; every later start compares with it and refuses a change that alters the
training trajectory (model, quantization, batch size, schedule, seed, data), listing
each differing key. Changes that do not (which stages run now, logging, eval and
checkpoint cadence, the mesh, where inputs live) are accepted and recorded.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from ofq_jax import config_keys
from ofq_jax.errors import UserError

FILE = "run.json"

EXEMPT = tuple(k.name for k in config_keys.TRAINING_KEYS if not k.run) + (
    "stages", "async_checkpointing", "tensorboard", "plots", "tracking.scales_every_steps",
    "mesh.", "fsdp_min_size", "data.data_dir", "data.manual_dir", "qat.teacher",
    "float.init_from", "cga.resume",
)
"""Keys (or ``prefix.``) that may differ between the starts of one run: the declared
keys that do not change a run (``config_keys``), and the cadences, outputs, mesh and
input paths."""


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{"qat.lr": 5e-4, ...}`` as JSON reads it back (tuples become lists)."""
  out: dict[str, Any] = {}

  def walk(prefix: str, value: Any) -> None:
    if isinstance(value, dict):
      for key, item in value.items():
        walk(f"{prefix}{key}.", item)
    else:
      out[prefix[:-1]] = value
  walk("", json.loads(config.to_json_best_effort()))
  return out


ADDED = {"cga.include_qk": False, "model.quant.qk_form": "factors"}
"""Trajectory keys added after runs were recorded, with the value those runs had (a
record without the key is that run, not a different one)."""


def _exempt(key: str) -> bool:
  return any(key == e or (e.endswith(".") and key.startswith(e)) for e in EXEMPT)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``key: old -> new`` for every trajectory key that differs (missing: ``<absent>``)."""
  absent = "<absent>"
  was = lambda key: old.get(key, ADDED.get(key, absent))
  return [f"{key}: {was(key)!r} -> {new.get(key, absent)!r}"
          for key in sorted(set(old) | set(new))
          if not _exempt(key) and was(key) != new.get(key, absent)]


def check_workdir(workdir: str) -> None:
  """Raises ``UserError`` unless ``workdir`` is a directory this process can write, or can
  be created: its nearest existing ancestor is a writable directory."""
  path = existing = os.path.abspath(workdir)
  while not os.path.exists(existing):  # ends at "/" at the latest
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = " (it is a file)" if existing == path else f" ({existing} is a file)"
    raise UserError(f"workdir={workdir!r} cannot be a run directory{where}; pass a directory "
                    "path (it is created when missing).")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"workdir={workdir!r}: {existing} is not writable by this user; pass a "
                    "directory you can write.")


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ``UserError`` when ``workdir`` is unusable or holds a run with a different
  trajectory."""
  check_workdir(workdir)
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  changed = differences(old, flatten(config))
  if changed:
    raise UserError(f"{workdir} holds a different run ({FILE}); changed: {'; '.join(changed)}. "
                    "Use a new --workdir, or rerun with the recorded values to resume.")


def recorded_model(workdir: str) -> ml_collections.ConfigDict | None:
  """The ``model`` config the run in ``workdir`` recorded; None without a record."""
  path = os.path.join(workdir, FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    flat = json.load(f)
  model: dict[str, Any] = {}
  for key, value in flat.items():
    if key.startswith("model."):
      *parents, leaf = key[len("model."):].split(".")
      node = model
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = value
  return ml_collections.ConfigDict(model)


def write(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records ``config`` (process 0), after ``check`` has accepted it."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(flatten(config), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
