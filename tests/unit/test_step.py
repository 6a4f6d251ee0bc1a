"""One train state and step (ofq_jax.step): structure, shardings, and the CGA report."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ofq_jax import cga, losses, sharding, step
from ofq_jax.models import calibrate, create_model, model_config
from ofq_jax.models.rounded import cga_targets
from ofq_jax.checkpointing import Checkpointer
from ofq_jax.models.tracker import LegacyTracker, tracking_config


def tiny_model():
  config = model_config(None, embed_dim=32, depth=1, num_heads=2, num_classes=10,
                        img_size=16, patch_size=8, quant=dict(enabled=True))
  model = create_model(config, 0)
  calibrate(model, jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)),
                               jnp.float32))
  return model


def test_state_structure_and_shardings():
  model = tiny_model()
  tx = optax.adamw(1e-3)
  mesh = sharding.make_mesh(4, 2)
  spec = step.create_train_state(model, tx, mesh, tracking=tracking_config(), min_size=512)
  assert set(spec.abstract) == {"params", "buffers", "opt_state", "step", "tracker"}
  fc1 = spec.shardings["params"]["blocks"][0]["mlp"]["fc1"]["kernel"]  # 32 x 128
  assert fc1.spec == P(None, "fsdp")
  moment = spec.shardings["opt_state"][0].mu["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert moment.spec == P(None, "fsdp")  # moments follow their parameter
  assert all(s.spec == P() for s in jax.tree.leaves(spec.shardings["buffers"]))
  state = step.initial_state(model, tx, spec)
  assert jax.tree.structure(state) == jax.tree.structure(spec.abstract)
  for value, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(spec.abstract)):
    assert value.shape == abstract.shape and value.dtype == abstract.dtype
    assert value.sharding == abstract.sharding
  np.testing.assert_array_equal(state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"],
                                model.blocks[0].mlp.fc1.kernel[...])
  assert int(state["step"]) == 0


def test_train_step_reports_the_cga_fractions_of_the_pre_step_weights():
  """The step reads the frozen shares from the CGA state; they equal the masks of the
  weights before the update, computed here on their own."""
  model = tiny_model()
  params = nnx.state(model, nnx.Param)
  bits = cga.target_bits(params, cga_targets(model, cga.DEFAULT_TARGETS))
  tx = cga.cga(optax.adamw(1e-3), bits, 0.05)
  mesh = sharding.make_mesh()
  spec = step.create_train_state(model, tx, mesh)
  state = step.initial_state(model, tx, spec)
  expected = cga.frozen_fractions(params, bits, 0.05)
  loss = losses.stage_loss(distill=False, num_classes=10)
  train_step = step.make_train_step(spec, loss, tx, optax.constant_schedule(1e-3))
  rng = np.random.default_rng(1)
  batch = sharding.global_batch({"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                                 "label": rng.integers(0, 10, size=8).astype(np.int32)}, mesh)
  state, metrics = train_step(state, batch)
  assert float(metrics["train/frozen_fraction"]) == pytest.approx(float(expected["total"]))
  name = "blocks.0.mlp.fc1.kernel"
  assert float(metrics[f"cga/frozen/{name}"]) == pytest.approx(float(expected[name]))
  assert int(state["step"]) == 1 and np.isfinite(float(metrics["train/loss"]))


def test_a_checkpoint_with_the_older_tracker_layout_resumes_with_its_history(tmp_path):
  """A checkpoint whose tracker has the layout before the fixed grid (per tensor:
  levels, directions, EMA, a scalar flip count) restores through the older layout:
  weights and the integer-level history come back as saved, the new fields start
  afresh, and everything lands on the current shardings."""
  model = tiny_model()
  tx = optax.adamw(1e-3)
  spec = step.create_train_state(model, tx, sharding.make_mesh(4, 2),
                                 tracking=tracking_config(), min_size=512)
  state = step.initial_state(model, tx, spec)
  legacy = LegacyTracker(nnx.merge(spec.tracker_graphdef, state["tracker"]))
  rng = np.random.default_rng(0)
  for t in legacy.trackers:
    t.ema.set_value(jnp.asarray(rng.uniform(size=t.ema.shape), jnp.float32))
    t.prev_direction.set_value(jnp.asarray(rng.integers(-1, 2, t.ema.shape), jnp.int8))
  old_state = dict(state, tracker=nnx.state(legacy))
  with Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
    ckpt.save(7, old_state, {"step": 7})
    with pytest.raises(Exception):  # the current layout alone cannot read it
      ckpt.manager.restore(7, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(spec.abstract)))
    restored_step, restored, _ = ckpt.restore(
        spec.abstract, older_layouts=step.tracker_older_layouts(spec))
  assert restored_step == 7
  tracker = nnx.merge(spec.tracker_graphdef, restored["tracker"])
  for old, new in zip(legacy.trackers, tracker.trackers):
    np.testing.assert_array_equal(new.ema[...], old.ema[...])
    np.testing.assert_array_equal(new.prev_direction[...], old.prev_direction[...])
  assert len(tracker.trackers) > len(legacy.trackers)  # QKR's implied factors, fresh
  for value, abstract in zip(jax.tree.leaves(restored), jax.tree.leaves(spec.abstract)):
    assert value.shape == abstract.shape and value.sharding == abstract.sharding
