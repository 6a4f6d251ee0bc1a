"""Checkpoint layouts (ofq_jax.upgrades): every older layout resumes, alone or chained;
the recorded version picks the layout; a newer one is refused without touching it.

The older states are built here from today's by the inverse of each upgrade (the
layouts' definitions in ``upgrades``), then saved as earlier versions wrote them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ofq_jax import cga, losses, sharding, step, upgrades
from ofq_jax.checkpointing import VERSION_KEY, Checkpointer
from ofq_jax.errors import UserError
from ofq_jax.models import deit
from ofq_jax.models.rounded import cga_targets
from ofq_jax.models.tracker import tracking_config
from support.tiny import tiny_quantized_deit


def _stage(kind: str, tracked: bool):
  """``(spec, tx, state)`` of a QAT-like (AdamW) or CGA stage on the tiny model."""
  model = tiny_quantized_deit()
  tx = optax.adamw(1e-3)
  if kind == "cga":
    bits = cga.target_bits(nnx.state(model, nnx.Param), cga_targets(model, deit.FAMILY.cga_targets))
    tx = cga.cga(tx, bits, 0.05)
  spec = step.create_train_state(model, tx, sharding.make_mesh(4, 2),
                                 tracking=tracking_config() if tracked else None, min_size=512)
  return spec, tx, step.initial_state(model, tx, spec)


def _layout_1_tracker(spec, state):
  """The state's tracker in layout 1, with a history of its own (random EMA and
  directions), and that tracker module."""
  old = upgrades.TrackerV1(nnx.merge(spec.tracker_graphdef, state["tracker"]))
  rng = np.random.default_rng(0)
  for t in old.trackers:
    t.ema.set_value(jnp.asarray(rng.uniform(size=t.ema.shape), jnp.float32))
    t.prev_direction.set_value(jnp.asarray(rng.integers(-1, 2, t.ema.shape), jnp.int8))
  return old


def _save(directory, state, meta, layout_version=None):
  with Checkpointer(str(directory), async_save=False, layout_version=layout_version) as ckpt:
    ckpt.save(7, state, meta)


def _restore(directory, spec, tx=None):
  with Checkpointer(str(directory), async_save=False,
                    layout_version=upgrades.LAYOUT_VERSION) as ckpt:
    return ckpt.restore(spec.abstract, older_layouts=upgrades.older_layouts(spec, tx))


def _assert_on_todays_shardings(restored, spec):
  assert jax.tree.structure(restored) == jax.tree.structure(spec.abstract)
  for value, abstract in zip(jax.tree.leaves(restored), jax.tree.leaves(spec.abstract)):
    assert value.shape == abstract.shape and value.sharding == abstract.sharding


def _assert_history_kept(spec, restored, old):
  tracker = nnx.merge(spec.tracker_graphdef, restored["tracker"])
  for before, after in zip(old.trackers, tracker.trackers):
    np.testing.assert_array_equal(after.ema[...], before.ema[...])
    np.testing.assert_array_equal(after.prev_direction[...], before.prev_direction[...])
  assert len(tracker.trackers) > len(old.trackers)  # QKR's implied factors, fresh


def test_which_older_layouts_differ_for_which_state():
  """Layout 1 differs where a tracker is kept, layout 2 where CGA's state is."""
  for kind, tracked, versions in (("qat", True, {1}), ("qat", False, set()),
                                  ("cga", False, {2}), ("cga", True, {1, 2})):
    spec, tx, _ = _stage(kind, tracked)
    assert set(upgrades.older_layouts(spec, tx)) == versions, (kind, tracked)


def test_a_layout_1_tracker_resumes_with_its_history(tmp_path):
  """A tracked QAT checkpoint of layout 1 (per tensor: levels, directions, EMA, a scalar
  flip count): weights and the integer-level history come back as saved, the new fields
  start afresh, on today's shardings."""
  spec, _, state = _stage("qat", tracked=True)
  old = _layout_1_tracker(spec, state)
  _save(tmp_path, dict(state, tracker=nnx.state(old)), {"step": 7})
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    with pytest.raises(Exception):  # today's layout alone cannot read it
      ckpt.manager.restore(7, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(spec.abstract)))
  restored_step, restored, _ = _restore(tmp_path, spec)
  assert restored_step == 7
  _assert_history_kept(spec, restored, old)
  np.testing.assert_array_equal(restored["params"]["blocks"][0]["mlp"]["fc1"]["kernel"],
                                state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"])
  _assert_on_todays_shardings(restored, spec)


def test_a_layout_1_cga_checkpoint_goes_through_both_upgrades(tmp_path):
  """Mid-CGA, layout 1: the old tracker and CGA's state without ``frozen``. The chain
  1 -> 2 -> 3 gives the history back and the frozen fractions of the restored weights
  (those ``tx.init`` gave the saved state), and the run goes on exactly as from the state
  that was saved: same loss, same frozen share, same weights after the next step."""
  spec, tx, state = _stage("cga", tracked=True)
  old = _layout_1_tracker(spec, state)
  _save(tmp_path, dict(state, tracker=nnx.state(old),
                       opt_state=upgrades.CGAStateV2(state["opt_state"].inner)), {"step": 7})
  _, restored, _ = _restore(tmp_path, spec, tx)
  _assert_history_kept(spec, restored, old)
  expected = state["opt_state"].frozen  # tx.init's fractions of the same weights
  assert set(restored["opt_state"].frozen) == set(expected)
  for name, value in expected.items():
    assert float(restored["opt_state"].frozen[name]) == float(value), name
  _assert_on_todays_shardings(restored, spec)
  # The next CGA step from the upgraded state is the step from the state as saved.
  train_step = step.make_train_step(spec, losses.stage_loss(distill=False, num_classes=10), tx,
                                    optax.constant_schedule(1e-3))
  rng = np.random.default_rng(1)
  batch = sharding.global_batch({"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                                 "label": rng.integers(0, 10, size=8).astype(np.int32)},
                                spec.mesh)
  after_upgrade, metrics_upgraded = train_step(restored, batch)
  after_saved, metrics_saved = train_step(state, batch)
  for key in ("train/loss", "train/frozen_fraction"):
    assert float(metrics_upgraded[key]) == float(metrics_saved[key]), key
  for a, b in zip(jax.tree.leaves(after_upgrade["params"]), jax.tree.leaves(after_saved["params"])):
    np.testing.assert_array_equal(a, b)


def test_new_checkpoints_record_their_layout_and_are_read_in_it_alone(tmp_path):
  """A checkpoint recording version 3 is read in layout 3 only: a layout-1 state
  mislabelled 3 is not silently upgraded, it fails to read."""
  spec, _, state = _stage("qat", tracked=True)
  _save(tmp_path / "today", state, {"step": 7}, upgrades.LAYOUT_VERSION)
  with Checkpointer(str(tmp_path / "today"), async_save=False) as ckpt:
    assert ckpt.read_meta(7)[VERSION_KEY] == upgrades.LAYOUT_VERSION
  _restore(tmp_path / "today", spec)
  old = _layout_1_tracker(spec, state)
  _save(tmp_path / "mislabelled", dict(state, tracker=nnx.state(old)),
        {"step": 7, VERSION_KEY: upgrades.LAYOUT_VERSION})
  with pytest.raises(RuntimeError, match="cannot be read"):
    _restore(tmp_path / "mislabelled", spec)


def test_a_recorded_older_version_reads_its_own_layout(tmp_path):
  """Recorded 1: layout 1's reader. Recorded 2 on a state whose layout 2 is layout 3
  (no CGA): today's reader."""
  spec, _, state = _stage("qat", tracked=True)
  old = _layout_1_tracker(spec, state)
  _save(tmp_path / "v1", dict(state, tracker=nnx.state(old)), {"step": 7, VERSION_KEY: 1})
  _assert_history_kept(spec, _restore(tmp_path / "v1", spec)[1], old)
  _save(tmp_path / "v2", state, {"step": 7, VERSION_KEY: 2})
  _, restored, _ = _restore(tmp_path / "v2", spec)
  np.testing.assert_array_equal(restored["tracker"]["trackers"][0]["ema"][...],
                                state["tracker"]["trackers"][0]["ema"][...])


def test_a_newer_layout_is_one_error_and_stays_in_place(tmp_path):
  spec, _, state = _stage("qat", tracked=False)
  _save(tmp_path, state, {"step": 7, VERSION_KEY: upgrades.LAYOUT_VERSION + 1})
  with pytest.raises(UserError, match=f"layout {upgrades.LAYOUT_VERSION + 1}.*reads layouts up "
                     f"to {upgrades.LAYOUT_VERSION}"):
    _restore(tmp_path, spec)
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    assert ckpt.steps() == [7]  # not set aside as unreadable
