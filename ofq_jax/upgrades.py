"""Training-checkpoint layouts: the version each checkpoint records, and the one place
that reads every older one.

The state's layout (``ofq_jax.step``) changed twice; each version, the commit that
made it, and the function that reads its predecessor:

==  =======  ==========================================================================
 1  8a09337  the first training system: per tensor, the tracker kept its levels,
             directions, EMA and a scalar flip count (``TrackerV1``); CGA's optimizer
             state was ``(inner,)`` (``CGAStateV2``)
 2  b603084  the tracker's per-module groups, fixed grid, per-part flips and QKR's
             implied factors: ``from_v1`` keeps the integer-level history, starts the
             new fields at the resumed step
 3  934b235  ``CGAState.frozen``, the fractions the CGA update computed: ``from_v2``
             fills it from the restored weights
==  =======  ==========================================================================

Checkpoints record ``checkpointing.VERSION_KEY`` in their meta since version 3's
record was added; one without it (written before) is tried at 3, 2, 1 in turn. A
layout change adds a version here: ``LAYOUT_VERSION`` + 1, a ``from_vN`` reading the
layout before it, and its entry in ``_UPGRADES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ofq_jax import cga, sharding
from ofq_jax.models.tracker import OscillationTracker, OscillationVar
from ofq_jax.step import State, StateSpec, cga_fractions_fn, tracker_start_fn

LAYOUT_VERSION = 3
"""The layout ``step.create_train_state`` builds today; recorded in every checkpoint."""

Upgrade = Callable[[State], State]
OlderLayouts = dict[int, tuple[State, Upgrade]]


class WeightTrackerV1(nnx.Module):
  """One tensor's tracker state in layout 1: the integer-level history and a scalar
  flip count."""

  def __init__(self, shape: tuple[int, ...]):
    self.prev_level = OscillationVar(jnp.zeros(shape, jnp.int8))
    self.prev_direction = OscillationVar(jnp.zeros(shape, jnp.int8))
    self.ema = OscillationVar(jnp.zeros(shape, jnp.float32))
    self.flips = OscillationVar(jnp.zeros((), jnp.float32))


class TrackerV1(nnx.Module):
  """The tracker of layout 1, shaped after today's ``tracker`` (its own tensors only:
  layout 1 followed no implied factors)."""

  def __init__(self, tracker: OscillationTracker):
    self.trackers = nnx.List([WeightTrackerV1(t.ema.shape)
                              for t in tracker.trackers[:len(tracker.weights)]])

  def upgrade(self, tracker: OscillationTracker) -> None:
    """Copies the integer-level history into ``tracker`` (a freshly reset one): the
    fixed grid and the implied factors start at the resumed step."""
    for old, new in zip(self.trackers, tracker.trackers):
      new.prev_level.set_value(old.prev_level[...])
      new.prev_direction.set_value(old.prev_direction[...])
      new.ema.set_value(old.ema[...])


class CGAStateV2(NamedTuple):
  """CGA's optimizer state in layouts 1 and 2: no ``frozen`` fractions."""
  inner: optax.OptState


def from_v1(spec: StateSpec, tx: optax.GradientTransformation | None, abstract: State
            ) -> tuple[State, Upgrade] | None:
  """Layout 1's tracker read replicated, then laid out like today's; None when the state
  tracks nothing (layouts 1 and 2 are then the same)."""
  del tx
  if spec.tracker is None or "tracker" not in abstract:
    return None
  old = nnx.eval_shape(lambda: TrackerV1(spec.tracker))
  old_graphdef, old_shapes = nnx.split(old)
  old_shardings = jax.tree.map(lambda _: sharding.replicated(spec.mesh), old_shapes)
  older = dict(abstract, tracker=sharding.abstract(old_shapes, old_shardings))
  start = tracker_start_fn(spec)

  def carry_history(fresh, previous):
    tracker = nnx.merge(spec.tracker_graphdef, fresh)
    nnx.merge(old_graphdef, previous).upgrade(tracker)
    return nnx.state(tracker)
  carry = jax.jit(carry_history, out_shardings=spec.shardings["tracker"])

  def upgrade(state: State) -> State:
    if jax.process_index() == 0:
      print("[tracking] checkpoint from before the fixed-grid tracker: oscillation history "
            "kept, fixed-grid and per-part counts start now", flush=True)
    fresh = start(state["params"], state["buffers"])
    return dict(state, tracker=carry(fresh, state["tracker"]))
  return older, upgrade


def from_v2(spec: StateSpec, tx: optax.GradientTransformation | None, abstract: State
            ) -> tuple[State, Upgrade] | None:
  """CGA's state without ``frozen``; the fractions come from the restored weights
  (``step.cga_fractions_fn``). None outside CGA."""
  opt_state = abstract.get("opt_state")
  if not isinstance(opt_state, cga.CGAState):
    return None
  if tx is None:
    raise ValueError("reading a CGA checkpoint of layout 2 needs the stage's optimizer (tx)")
  older = dict(abstract, opt_state=CGAStateV2(opt_state.inner))
  frozen = cga_fractions_fn(spec, tx)

  def upgrade(state: State) -> State:
    return dict(state, opt_state=cga.CGAState(state["opt_state"].inner,
                                              frozen(state["params"])))
  return older, upgrade


_UPGRADES = ((2, from_v2), (1, from_v1))
"""Newest first: the version each reads, and the function reading it."""


def older_layouts(spec: StateSpec, tx: optax.GradientTransformation | None = None,
                  abstract: State | None = None) -> OlderLayouts:
  """``{version: (its abstract state, upgrade to today's)}`` for every older layout that
  differs from the next one for this state, for ``Checkpointer.restore``.

  ``abstract``: the restore target when it is not ``spec.abstract`` (CGA reads the QAT
  stage's optimizer state); ``tx``: the stage's optimizer (layout 2 of a CGA state).
  """
  layouts: OlderLayouts = {}
  newer = spec.abstract if abstract is None else abstract
  to_today: Upgrade = lambda state: state
  for version, read in _UPGRADES:
    made = read(spec, tx, newer)
    if made is None:
      continue
    newer, upgrade = made
    to_today = _then(upgrade, to_today)
    layouts[version] = (newer, to_today)
  return layouts


def _then(first: Upgrade, second: Upgrade) -> Upgrade:
  return lambda state: second(first(state))

