"""One train state and step (ofq_jax.step): structure, shardings, and the CGA report."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ofq_jax import cga, losses, sharding, step
from ofq_jax.models import deit
from ofq_jax.models.rounded import cga_targets
from ofq_jax.models.tracker import tracking_config
from support.tiny import tiny_quantized_deit


def test_state_structure_and_shardings():
  model = tiny_quantized_deit()
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
  model = tiny_quantized_deit()
  params = nnx.state(model, nnx.Param)
  bits = cga.target_bits(params, cga_targets(model, deit.FAMILY.cga_targets))
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
