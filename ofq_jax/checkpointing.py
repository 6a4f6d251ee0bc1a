"""A thin orbax wrapper: periodic async saves, keep-last-N, restore onto shardings,
and falling back to an older checkpoint when the newest one cannot be read."""

from __future__ import annotations

import os
import time
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Checkpoints of one training stage: ``{"state": pytree, "meta": json}`` per step."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               log=print):
    self.directory = os.path.abspath(directory)
    self.log = log
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    # Items are named by the Composite args of each call (``item_names`` is deprecated).
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[int, Any, dict[str, Any]] | None:
    """Newest readable checkpoint (or ``step``) restored onto ``abstract_state``'s shardings.

    Returns ``(step, state, meta)``, or None when there is none. An unreadable newest
    checkpoint is reported and the previous one is tried.
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for index, candidate in enumerate(candidates):
      try:
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
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
