"""SIGTERM -> the agreed stop (ofq_jax.preemption) and the loop's ``_due`` cadence."""

import os
import signal

import pytest

from ofq_jax import preemption
from ofq_jax.train import _due


@pytest.mark.parametrize("every,at_end,due_steps", [
    (3, True, [3, 6, 7]),  # every 3 steps and at the end (logs, scales)
    (3, False, [3, 6]),  # the end has its own eval / checkpoint
    (7, False, []),
    (0, True, []),  # 0 switches the action off, even at the end
])
def test_due(every, at_end, due_steps):
  assert [s for s in range(1, 8) if _due(s, every, 7, at_end=at_end)] == due_steps


def test_stop_signal_one_process():
  """SIGTERM sets the flag, one process agrees with itself at once, the previous
  handler comes back on exit."""
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignal(check_every=5) as stop:
    assert not stop.agreed(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.agreed(2)
  assert signal.getsignal(signal.SIGTERM) is previous


def test_fault_hook_is_a_no_op_without_the_variable():
  assert os.environ.get(preemption.FAULT_ENV) is None
  preemption.after_step("qat", 1, checkpointer=None)  # would fail if it acted
