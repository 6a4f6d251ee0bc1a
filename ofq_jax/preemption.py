"""Stopping on SIGTERM at a step every process agrees on, and the tests' fault hook.

A preemption notice (SIGTERM) reaches one process of a multi-host job, or reaches them
at different steps. Orbax saves are collective, so a process that saves alone waits at
its barrier forever. ``StopSignal.agreed(step)`` therefore combines every process's
flag (an all-gather, every ``check_every`` steps, at the same steps on every process):
all of them see the same answer at the same step, save that step and exit.
"""

from __future__ import annotations

import functools
import os
import signal
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

FAULT_ENV = "OFQ_JAX_FAULT_AFTER_STEP"
"""Fault injection for the preemption tests: ``STAGE:STEP`` SIGKILLs this process once
the checkpoint of that step of that stage is written; ``STAGE:STEP:term`` sends it
SIGTERM after that step instead (a preemption notice, seen at the next agreed check)."""


class StopSignal:
  """SIGTERM -> a local flag; ``agreed`` turns the flags of all processes into one answer."""

  def __init__(self, check_every: int = 1):
    self.check_every = max(1, check_every)
    self.requested = False
    self._previous = None

  def __enter__(self) -> StopSignal:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int) -> bool:
    """True on every process at the same step once any process has seen SIGTERM.

    One process answers from its flag at every step; several ask each other every
    ``check_every`` steps (a collective, so every process must call this each step).
    """
    if jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))


@functools.cache
def _fault() -> tuple[str, int, str]:
  stage, step, kind = (os.environ.get(FAULT_ENV, "") + "::").split(":")[:3]
  return stage, int(step) if step else -1, kind


def after_step(stage: str, step: int, checkpointer: Any) -> None:
  """The fault-injection hook: a no-op unless ``FAULT_ENV`` names this stage and step."""
  fault_stage, fault_step, kind = _fault()
  if (stage, step) != (fault_stage, fault_step):
    return
  if kind == "term":
    os.kill(os.getpid(), signal.SIGTERM)
    return
  checkpointer.wait()
  os.kill(os.getpid(), signal.SIGKILL)
