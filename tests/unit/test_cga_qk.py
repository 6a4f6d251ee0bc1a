"""``cga.include_qk``: CGA that also anneals QKR's W_qk, in the product form
(``model.quant.qk_form='product'``, spec 4.4's suggestion; off by default).

The QAT checkpoint here is a calibrated QAT start with random AdamW moments and a count
of 7 (no QAT step is compiled): what matters is that every value is carried or
converted, not what training made of it.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ofq_jax import cga, export, losses, optim, product_form, sharding, stages, step
from ofq_jax.checkpointing import Checkpointer, save_model_dir
from ofq_jax.data import build
from ofq_jax.errors import UserError, one_line
from ofq_jax.evaluate import load_for_eval
from ofq_jax.interop import export_ofq_torch, load_ofq_torch, quantize_from_float
from ofq_jax.models import (calibrate, create_model, float_config, model_config,
                            quantized_config, swin)
from ofq_jax.models import deit
from ofq_jax.models.config import quantized_configs, with_qk_form
from ofq_jax.models.rounded import CGATarget, cga_targets
from ofq_jax.paths import dotted, state_path

from support.runs import digits_config

SMALL = {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2, "model.img_size": 16,
         "model.patch_size": 8, "data.image_size": 16, "batch_size": 8, "num_train_steps": 4}
"""One block of 32 channels on the 16 px digits: 6 tokens, W_qk of shape (2, 32, 32)."""
QK = "blocks.0.attn.qk_kernel"


def _images(n=4, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def _deit(form="factors", **quant):
  config = model_config(None, embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=16,
                        num_classes=10, quant=dict(enabled=True, **quant))
  return create_model(with_qk_form(config, form), 0)


_forward = nnx.jit(lambda model, images: model(images))


def _flat(tree) -> dict[str, np.ndarray]:
  return {dotted(state_path(p)): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- the model
@pytest.mark.parametrize("matmul", ["fake", "integer"])
def test_product_form_has_the_factors_forms_logits(matmul):
  """One seed builds both forms with W_qk = W_q^T W_k; set explicitly anyway, calibrated
  alike, their logits are equal (the forward is one function of W_qk)."""
  factors, product = _deit(matmul=matmul), _deit("product", matmul=matmul)
  for f_block, p_block in zip(factors.blocks, product.blocks):
    assert p_block.attn.q_kernel is None and f_block.attn.qk_kernel is None
    np.testing.assert_array_equal(p_block.attn.qk_kernel[...], f_block.attn.qk_product())
    p_block.attn.qk_kernel.set_value(f_block.attn.qk_product())
  images = _images()
  calibrate(factors, images)
  calibrate(product, images)
  np.testing.assert_array_equal(_forward(product, images), _forward(factors, images))


def test_swin_and_quantize_from_float_build_the_product_form():
  config = swin.model_config(None, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                             patch_size=2, img_size=16, num_classes=10,
                             quant=dict(enabled=True))
  factors = swin.create_model(config, 0)
  product = swin.create_model(with_qk_form(config, "product"), 0)
  images = _images()
  np.testing.assert_array_equal(_forward(product, images), _forward(factors, images))
  float_model = create_model(float_config(_deit().config), 0)
  from_factors = quantize_from_float(float_model, _deit().config)
  from_product = quantize_from_float(float_model, with_qk_form(_deit().config, "product"))
  for f_block, p_block in zip(from_factors.blocks, from_product.blocks):
    np.testing.assert_array_equal(p_block.attn.qk_product(), f_block.attn.qk_product())


def test_product_cga_mask_is_spec_4_2_per_head_row():
  """The product's mask equals spec 4.2 by hand in numpy on ``W_qk`` as ``(H*D, D)``, one
  scale per row (= per (head, row)), lo / hi over the whole tensor."""
  rng = np.random.default_rng(5)
  heads, dim, bits, br = 3, 16, 2, 0.05
  w = (rng.normal(size=(heads, dim, dim)) * rng.uniform(0.5, 2, size=(heads, dim, 1)))
  w = w.astype(np.float32)
  mask = np.asarray(cga.frozen_masks({"qk": jnp.asarray(w)}, {"qk": CGATarget(bits, (2,))},
                                     br)["qk"])
  rows = w.reshape(heads * dim, dim).astype(np.float64)
  n = 2 ** (bits - 1)
  t = np.clip(rows / (2 * np.mean(np.abs(rows), axis=1, keepdims=True)), -1, 1 - 1e-6) * n - 0.5
  levels = np.round(t)
  trainable = np.zeros_like(t, bool)
  for i in range(int(levels.min()), int(levels.max())):
    trainable |= (t - i >= 0.5 - br) & (t - i <= 0.5 + br)
  np.testing.assert_array_equal(mask, ~trainable.reshape(w.shape))
  assert 0.5 < mask.mean() < 1.0


def test_kernel_targets_keep_their_masks_bit_for_bit():
  """A kernel's ``CGATarget`` carries ``(0,)``: its mask is the plain-int one."""
  model = _deit("product")
  targets = cga_targets(model, cga.QK_TARGETS + "|" + deit.FAMILY.cga_targets)
  assert targets[QK].reduce_axes == (2,)
  assert all(t.reduce_axes == (0,) and t == 2 for k, t in targets.items() if "qk" not in k)
  params = nnx.state(model, nnx.Param)
  masks = lambda bits: jax.jit(lambda p: cga.frozen_masks(p, bits, 0.05))(params)
  with_axes = masks(cga.target_bits(params, targets))
  plain = masks(cga.target_bits(params, {k: int(t) for k, t in targets.items()
                                         if "qk" not in k}))
  for name, mask in _flat(plain).items():
    if "qk" not in name:
      np.testing.assert_array_equal(_flat(with_axes)[name], mask, err_msg=name)


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def qat(tmp_path_factory):
  """A workdir with a float teacher and a QAT checkpoint (tracked); returns the run and
  the saved QAT state on the host."""
  workdir = tmp_path_factory.mktemp("cga_qk")
  config = digits_config(**SMALL)
  save_model_dir(str(workdir / "models" / "float"), create_model(float_config(config.model)))
  run = stages.Run(config, str(workdir), build(config.data), sharding.make_mesh())
  plan = stages.build_qat_plan(config, run)
  spec = step.create_train_state(plan.student, plan.tx, run.mesh, tracking=plan.tracking,
                                 min_size=config.fsdp_min_size)
  state = sharding.to_host(plan.fresh_state(spec))
  rng = np.random.default_rng(0)
  state["opt_state"] = jax.tree.map(
      lambda s: _random_moments(s, rng) if isinstance(s, optax.ScaleByAdamState) else s,
      state["opt_state"], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
  with Checkpointer(run.path("checkpoints", "qat"), async_save=False) as ckpt:
    ckpt.save(4, sharding.place(state, spec.shardings), {"step": 4, "stage": "qat",
                                                          "tracked": True})
  return run, state


def _random_moments(adam: optax.ScaleByAdamState, rng) -> optax.ScaleByAdamState:
  """Moments no fresh state has (mu signed, nu positive) and count 7."""
  draw = lambda x: rng.normal(size=x.shape).astype(x.dtype)
  return adam._replace(count=np.int32(7), mu=jax.tree.map(draw, adam.mu),
                       nu=jax.tree.map(lambda x: np.abs(draw(x)), adam.nu))


def _only(opt_state, kind: type):
  """The one ``kind`` state inside ``opt_state``."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
           if isinstance(s, kind)]
  assert len(found) == 1
  return found[0]


def _adam(opt_state) -> optax.ScaleByAdamState:
  return _only(opt_state, optax.ScaleByAdamState)


def _adam_groups(opt_state) -> dict[str, optax.ScaleByAdamState]:
  """``{group: its Adam state}`` of ``optim.adamw(own_count=...)`` (optax.partition)."""
  partition = _only(opt_state, optax.transforms.PartitionState)
  return {group: _adam(inner) for group, inner in partition.inner_states.items()}


def _cga_start(run, include_qk: bool):
  """The CGA plan of ``run``'s config with ``cga.include_qk``, its spec and fresh state."""
  config = copy.deepcopy(run.config)
  config.cga.include_qk = include_qk
  cga_run = stages.Run(config, run.workdir, run.source, run.mesh)
  plan = stages.build_cga_plan(config, cga_run)
  spec = step.create_train_state(plan.student, plan.tx, run.mesh, tracking=plan.tracking,
                                 min_size=config.fsdp_min_size)
  return config, plan, spec, plan.fresh_state(spec)


def test_default_cga_is_the_reference(qat):
  """include_qk=False: factors form, the reference's targets, the QAT state as it was."""
  run, saved = qat
  assert run.config.cga.include_qk is False
  assert cga.stage_targets(run.config.cga) == run.config.cga.targets
  assert product_form.qat_layout(run.config, run.mesh, lambda _: None) is None
  _, plan, _, state = _cga_start(run, include_qk=False)
  assert plan.student.blocks[0].attn.qk_kernel is None
  assert set(state["opt_state"].frozen) == {*cga_targets(plan.student, deit.FAMILY.cga_targets),
                                            "total"}
  assert not any("qk" in name for name in state["opt_state"].frozen)
  for key in ("params", "buffers", "tracker"):
    assert _flat(sharding.to_host(state[key])).keys() == _flat(saved[key]).keys()
    for name, value in _flat(sharding.to_host(state[key])).items():
      np.testing.assert_array_equal(value, _flat(saved[key])[name], err_msg=name)
  for moment in ("mu", "nu"):
    new = _flat(sharding.to_host(getattr(_adam(state["opt_state"].inner), moment)))
    old = _flat(getattr(_adam(saved["opt_state"]), moment))
    assert new.keys() == old.keys() and "blocks.0.attn.q_kernel" in new
    for name, value in new.items():
      np.testing.assert_array_equal(value, old[name], err_msg=f"{moment} {name}")


@pytest.fixture(scope="module")
def with_qk(qat):
  return _cga_start(qat[0], include_qk=True)


def test_qat_state_becomes_the_product_form(qat, with_qk):
  """W_qk = W_q^T W_k of the QAT factors (as the QAT forward computes it); every other
  parameter, its moments, the count, the buffers and the tracker carried over; W_qk's
  moments zero in an AdamW group of its own whose count is zero too."""
  run, saved = qat
  _, plan, _, state = with_qk
  qat_model = create_model(quantized_config(run.config.model))
  nnx.update(qat_model, saved["params"], saved["buffers"])
  np.testing.assert_array_equal(state["params"]["blocks"][0]["attn"]["qk_kernel"],
                                qat_model.blocks[0].attn.qk_product())
  params, qat_params = _flat(sharding.to_host(state["params"])), _flat(saved["params"])
  assert set(params) - set(qat_params) == {QK}
  assert set(qat_params) - set(params) == {"blocks.0.attn.q_kernel", "blocks.0.attn.k_kernel"}
  groups = sharding.to_host(_adam_groups(state["opt_state"].inner))
  adam, own = groups[optim.SHARED], groups[optim.OWN]
  qat_adam = _adam(saved["opt_state"])
  assert int(adam.count) == int(qat_adam.count) == 7
  assert int(own.count) == 0
  for moment in ("mu", "nu"):
    new, old = _flat(getattr(adam, moment)), _flat(getattr(qat_adam, moment))
    assert set(old) - set(new) == {"blocks.0.attn.q_kernel", "blocks.0.attn.k_kernel"}
    for name, value in new.items():
      np.testing.assert_array_equal(value, old[name], err_msg=f"{moment} {name}")
    product_moment = _flat(getattr(own, moment))
    assert set(product_moment) == {QK} and np.all(product_moment[QK] == 0.0)
  for name, value in params.items():
    if name != QK:
      np.testing.assert_array_equal(value, qat_params[name], err_msg=name)
  buffers = _flat(sharding.to_host(state["buffers"]))
  assert buffers.keys() == _flat(saved["buffers"]).keys()
  for name, value in buffers.items():
    np.testing.assert_array_equal(value, _flat(saved["buffers"])[name], err_msg=name)
  tracker, qat_tracker = _flat(sharding.to_host(state["tracker"])), _flat(saved["tracker"])
  assert tracker and set(tracker) <= set(qat_tracker)
  for name, value in tracker.items():  # incl. the qk_product's: same name, same shape
    np.testing.assert_array_equal(value, qat_tracker[name], err_msg=name)
  assert plan.student.config.quant.qk_form == "product"


def test_first_product_update_is_a_fresh_adams(with_qk):
  """W_qk's own Adam count makes its first update bias-corrected: a trainable entry moves
  by lr * |g / |g| + wd * w| ~ lr (the formula), where under the QAT count t it moved by
  lr * (1 - b1) / (1 - b1^(t+1)) / sqrt((1 - b2) / (1 - b2^(t+1))): 0.49 lr at this
  fixture's t = 7, ~3.2 lr at a run's thousands; the shared group's count goes on."""
  config, plan, spec, state = with_qk
  state = sharding.place(sharding.to_host(state), spec.shardings)  # the step donates it
  train_step = step.make_train_step(spec, losses.stage_loss(distill=False, num_classes=10),
                                    plan.tx, plan.schedule)
  bits = cga.target_bits(state["params"],
                         cga_targets(plan.student, cga.stage_targets(config.cga)))
  frozen = np.asarray(cga.frozen_masks(state["params"], bits, config.cga.boundary_range)
                      ["blocks"][0]["attn"]["qk_kernel"])
  before = np.asarray(sharding.to_host(state["params"])["blocks"][0]["attn"]["qk_kernel"])
  rng = np.random.default_rng(4)
  batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 10, size=8).astype(np.int32)}
  state, _ = train_step(state, sharding.global_batch(batch, spec.mesh))
  after = np.asarray(sharding.to_host(state["params"])["blocks"][0]["attn"]["qk_kernel"])
  lr, wd = config.qat.min_lr, config.qat.weight_decay
  step_size = np.abs(after - before)[~frozen] / lr
  decay = np.abs(wd * before[~frozen])
  moved = step_size > 1e-3  # the others had no gradient (StatsQ's clipped entries)
  assert moved.sum() >= 5, step_size
  assert np.all(np.abs(step_size[moved] - 1.0) <= decay[moved] + 1e-2), step_size[moved]
  groups = sharding.to_host(_adam_groups(state["opt_state"].inner))
  assert int(groups[optim.OWN].count) == 1 and int(groups[optim.SHARED].count) == 8


def test_frozen_qk_entries_stay_bit_exact_through_cga_steps(with_qk):
  """The issue's must-show: 4 CGA steps (AdamW with weight decay at the CGA lr); every
  entry of W_qk frozen before a step is bit-identical after it, and trainable ones move.
  The frozen share of the product is reported per step."""
  config, plan, spec, state = with_qk
  state = sharding.place(sharding.to_host(state), spec.shardings)  # the step donates it
  loss = losses.stage_loss(distill=False, num_classes=10)
  train_step = step.make_train_step(spec, loss, plan.tx, plan.schedule)
  bits = cga.target_bits(state["params"],
                         cga_targets(plan.student, cga.stage_targets(config.cga)))
  masks = jax.jit(lambda p: cga.frozen_masks(p, bits, config.cga.boundary_range))
  rng = np.random.default_rng(3)
  moved = 0
  for _ in range(4):
    before = np.asarray(sharding.to_host(state["params"])["blocks"][0]["attn"]["qk_kernel"])
    frozen = np.asarray(masks(state["params"])["blocks"][0]["attn"]["qk_kernel"])
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=8).astype(np.int32)}
    state, metrics = train_step(state, sharding.global_batch(batch, spec.mesh))
    after = np.asarray(sharding.to_host(state["params"])["blocks"][0]["attn"]["qk_kernel"])
    assert 0.5 < frozen.mean() < 1.0
    np.testing.assert_array_equal(after[frozen], before[frozen])
    moved += int(np.sum(after[~frozen] != before[~frozen]))
    assert float(metrics[f"cga/frozen/{QK}"]) == pytest.approx(frozen.mean(), abs=1e-7)
  assert moved > 0


def test_cga_model_dir_evaluates_and_exports(with_qk, tmp_path):
  """models/cga in the product form: evaluate's loader finds it from the training config
  (factors), the packed export holds it (no latent W_qk) with the same logits, and the
  reference export refuses it in one line."""
  config, plan, _, state = with_qk
  model = plan.student
  nnx.update(model, sharding.to_host(state["params"]), sharding.to_host(state["buffers"]))
  save_model_dir(str(tmp_path / "cga"), model)
  loaded, kind = load_for_eval(str(tmp_path / "cga"), config.model)
  assert kind == "ofq_jax quantized (W_qk form)"
  for name, value in _flat(sharding.to_host(state["params"])).items():
    np.testing.assert_array_equal(_flat(nnx.state(loaded, nnx.Param))[name], value, name)
  path = tmp_path / "model.safetensors"
  export.export_integer(loaded, path)
  packed = export.load_integer(path, quantized_config(config.model))
  images = _images()
  np.testing.assert_allclose(packed(images), _forward(loaded, images), rtol=0, atol=1e-5)
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(path), framework="numpy") as f:
    assert QK not in set(f.keys())
  with pytest.raises(UserError, match="no W_qk parameter.*cannot be factored back") as error:
    export_ofq_torch(loaded)
  assert "\n" not in str(error.value) and "ofq_jax.export" in str(error.value)


# ----------------------------------------------------------------------------- user errors
def test_user_errors():
  with pytest.raises(UserError, match="qk_form='product'.*attention='standard'"):
    _deit("product", attention="standard")
  with pytest.raises(UserError, match="qk_form='bogus' is not one of"):
    _deit("bogus")
  config = swin.model_config(None, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                             patch_size=2, img_size=16, quant=dict(attention="standard"))
  with pytest.raises(UserError, match="qk_form='product'"):
    swin.create_model(with_qk_form(config, "product"))
  with pytest.raises(UserError, match="reference's checkpoints hold W_q and W_k"):
    load_ofq_torch({}, with_qk_form(_deit().config, "product"))
  digits = digits_config("method=statsq", **SMALL)
  digits.cga.include_qk = True
  with pytest.raises(UserError, match="cga.include_qk=True.*attention='standard'") as error:
    stages.check_cga(digits, "/nonexistent", None)
  assert one_line(error.value).startswith("error: cga.include_qk")
  assert len(quantized_configs(digits.model)) == 1  # no product form without QKR


def test_runs_recorded_before_the_new_keys_still_resume():
  """A run.json without cga.include_qk / model.quant.qk_form is a run with their
  defaults (the reference); turning include_qk on is a different run."""
  from ofq_jax import run_record  # pylint: disable=import-outside-toplevel
  from ofq_jax.recipes import digits  # pylint: disable=import-outside-toplevel
  new = run_record.flatten(digits())
  old = {k: v for k, v in new.items() if k not in run_record.ADDED}
  assert run_record.differences(old, new) == []
  assert run_record.differences(old, dict(new, **{"cga.include_qk": True})) == [
      "cga.include_qk: False -> True"]
