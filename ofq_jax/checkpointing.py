"""Orbax, in two shapes: a stage's training checkpoints (periodic async saves,
keep-last-N, restore onto shardings, falling back to an older checkpoint when the
newest one cannot be read) and a model directory (a stage's final parameters)."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from ofq_jax import compat
from ofq_jax.errors import UserError
from ofq_jax.models.config import stored_model_differences

VERSION_KEY = "layout_version"
"""The meta key of a training checkpoint's state layout (``ofq_jax.upgrades``)."""

MIN_REPLICA_SLICE_BYTES = 1 << 20
"""Orbax splits the saving of a replicated array among its replicas, each writing a
slice that one eager op per device cuts out; below this many bytes per slice one replica
writes the array whole. On one host with 8 devices the splitting cost a tiny Swin's
checkpoint 4 s per save (4,000 eager slices) and saved nothing; large arrays on a pod
are still split."""

MODEL_CONFIG_FILE = "model_config.json"
"""Beside the arrays of a model directory: the config that built the model, so a reader
with another config (2-bit weights read as 4-bit) is refused instead of silently
re-quantizing them. Directories written before it existed load unchecked."""


@functools.cache
def _array_handler_with_slice_floor() -> None:
  """Orbax's ``jax.Array`` handler with ``MIN_REPLICA_SLICE_BYTES`` (process-wide: orbax
  keeps one registry), registered before the first save."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


def save_model_dir(directory: str, model: nnx.Module) -> None:
  """Final parameters (and quantizer buffers) of a stage and the model's config, for the
  next stage, evaluation or export."""
  _array_handler_with_slice_floor()
  _, state = nnx.split(model)
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, state, force=True)
  checkpointer.wait_until_finished()
  config = getattr(model, "config", None)
  if config is not None and jax.process_index() == 0:
    path = os.path.join(directory, MODEL_CONFIG_FILE)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    os.replace(f"{path}.tmp", path)


def model_dir_config(directory: str) -> ml_collections.ConfigDict | None:
  """The config a model directory was saved with; None for directories from before."""
  path = os.path.join(directory, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def check_model_dir(directory: str, asked: ml_collections.ConfigDict) -> None:
  """A one-line ``UserError`` when ``directory`` holds a model another config built."""
  stored = model_dir_config(directory)
  if stored is None:
    return
  differences = stored_model_differences(stored, asked)
  if differences:
    listed = "; ".join(f"model.{d}" for d in differences)
    raise UserError(f"{directory} holds a model built with another config ({listed}); "
                    "pass the config it was trained with (its workdir's run.json records it) "
                    "or override those keys.")


def load_model_dir(directory: str, model: nnx.Module) -> nnx.Module:
  """Restores ``save_model_dir`` output into ``model`` (built from the same config)."""
  if getattr(model, "config", None) is not None:
    check_model_dir(directory, model.config)
  _, state = nnx.split(model)
  abstract = jax.tree.map(compat.to_shape_dtype_struct, state)
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract)
  nnx.update(model, restored)
  return model


def load_fitting_model_dir(directory: str,
                           candidates: Sequence[tuple[str, Callable[[], nnx.Module]]],
                           what: str = "an ofq_jax model directory") -> tuple[nnx.Module, str]:
  """``directory`` restored into the first of ``candidates`` (``(label, build)``) whose
  structure it holds, and that label; a one-line ``UserError`` listing every mismatch
  when none fits. The candidates differ only in keys ``check_model_dir`` does not compare,
  so its refusal (the directory records another model) is final."""
  errors = []
  for label, build in candidates:
    try:
      return load_model_dir(directory, build()), label
    except UserError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      errors.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
  raise UserError(f"--checkpoint={directory} is not {what} for this config (fix "
                  "--config.model to the one it was trained with): " + " | ".join(errors))


class Checkpointer:
  """Checkpoints of one training stage: ``{"state": pytree, "meta": json}`` per step.

  ``layout_version``: the state layout this reader builds (``upgrades.LAYOUT_VERSION``),
  recorded in the meta of every save and compared with a checkpoint's before reading it.
  """

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               log=print, layout_version: int | None = None):
    self.directory = os.path.abspath(directory)
    self.log = log
    self.layout_version = layout_version
    _array_handler_with_slice_floor()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    # Items are named by the Composite args of each call (``item_names`` is deprecated).
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    if self.layout_version is not None:
      meta = {**meta, VERSION_KEY: self.layout_version}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, step: int | None = None, *,
              older_layouts: Mapping[int, tuple[Any, Callable[[Any], Any]]] | None = None
              ) -> tuple[int, Any, dict[str, Any]] | None:
    """Newest readable checkpoint (or ``step``) restored onto ``abstract_state``'s shardings.

    Returns ``(step, state, meta)``, or None when there is none. An unreadable newest
    checkpoint is reported and the previous one is tried. ``older_layouts``:
    ``{version: (abstract, upgrade)}`` for the state layouts earlier versions wrote
    (``upgrades.older_layouts``): a checkpoint recording its version is read in that
    layout alone; one from before versions were recorded, in each layout, newest first.
    A checkpoint of a newer layout than ``layout_version`` is a ``UserError``.
    """
    older_layouts = older_layouts or {}
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for index, candidate in enumerate(candidates):
      try:
        restored = self._restore_step(candidate, abstract_state, older_layouts)
      except UserError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        if step is not None or index == len(candidates) - 1:
          raise RuntimeError(f"Checkpoint {candidate} in {self.directory} cannot be read: "
                             f"{type(error).__name__}: {error}") from error
        aside = self._set_aside(candidate)
        self.log(f"Checkpoint {candidate} in {self.directory} cannot be read "
                 f"({type(error).__name__}: {str(error)[:200]}); moved it to {aside} and "
                 f"falling back to checkpoint {candidates[index + 1]}.")
        continue
      return candidate, restored["state"], restored["meta"]
    return None

  def _layouts_to_try(self, step: int, abstract_state: Any, older_layouts) -> list:
    """``(abstract, upgrade)`` pairs for ``step``: the one its recorded version names, or
    every layout, today's first, when it records none."""
    today = (abstract_state, None)
    recorded = self.read_meta(step).get(VERSION_KEY)
    if recorded is None or self.layout_version is None:
      return [today] + [older_layouts[v] for v in sorted(older_layouts, reverse=True)]
    if recorded > self.layout_version:
      raise UserError(f"checkpoint {step} in {self.directory} has state layout {recorded}; "
                      f"this ofq_jax reads layouts up to {self.layout_version}: run it with the "
                      "ofq_jax that wrote it, or start the stage afresh in another workdir.")
    # A version absent from older_layouts has the layout of the next one for this state.
    newer = [v for v in older_layouts if recorded <= v < self.layout_version]
    return [older_layouts[min(newer)]] if newer else [today]

  def _restore_step(self, step: int, abstract_state: Any, older_layouts) -> dict[str, Any]:
    errors = []
    for abstract, upgrade in self._layouts_to_try(step, abstract_state, older_layouts):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as error:  # pylint: disable=broad-except
        errors.append(error)
        continue
      if upgrade is not None:
        restored = dict(restored, state=upgrade(restored["state"]))
      return restored
    raise errors[0]  # the first layout's reason

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable step out of orbax's way (kept for inspection)."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, f"unreadable-{step}-{int(time.time())}")
    os.replace(source, target)
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
