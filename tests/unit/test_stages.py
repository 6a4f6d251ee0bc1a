"""Stage plans (ofq_jax.stages): what each builder makes of the config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ofq_jax import cga, losses, sharding, stages, step
from ofq_jax.checkpointing import save_model_dir
from ofq_jax.data import build
from ofq_jax.models import create_model, float_config
from ofq_jax.paths import dotted, state_path

from support.runs import digits_config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> stages.Run:
  """The tiny digits config by epochs, with a float model in the workdir (the teacher)."""
  workdir = tmp_path_factory.mktemp("plans")
  config = digits_config(num_train_steps=-1)
  save_model_dir(str(workdir / "models" / "float"), create_model(float_config(config.model)))
  return stages.Run(config, str(workdir), build(config.data), sharding.make_mesh())


def test_the_pipeline_order():
  assert tuple(stages.STAGES) == ("float", "qat", "cga")
  assert [s.quantized for s in stages.STAGES.values()] == [False, True, True]


def _bound(loss) -> tuple:
  assert isinstance(loss, functools.partial)
  return loss.func, loss.keywords


def test_float_plan(run):
  config = run.config
  plan = stages.build_float_plan(config, run)
  assert (plan.name, plan.teacher, plan.tracking, plan.seed) == ("float", None, None, 0)
  epochs = config.float.epochs + config.float.cooldown_epochs
  assert plan.total_steps == epochs * run.steps_per_epoch
  assert _bound(plan.loss)[0] is losses.float_loss
  assert not plan.student.config.quant.enabled


def test_qat_plan(run):
  config = run.config
  plan = stages.build_qat_plan(config, run)
  assert plan.seed == 1 and plan.tracking is config.tracking
  assert plan.student.config.quant.enabled and not plan.teacher.config.quant.enabled
  epochs = config.qat.epochs + config.qat.cooldown_epochs
  assert plan.total_steps == epochs * run.steps_per_epoch
  func, keywords = _bound(plan.loss)
  assert func is losses.distill_loss and keywords["teacher_logits"] == "cls"
  spec = step.create_train_state(plan.student, plan.tx, run.mesh, tracking=plan.tracking)
  state = plan.fresh_state(spec)  # calibrated on the first batch: no step is left at 1
  steps = [np.asarray(x) for x in _lsq_steps(state["params"])]
  assert steps and all(np.all(s != 1.0) for s in steps)
  assert int(state["step"]) == 0


def _lsq_steps(params):
  return [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if dotted(state_path(p)).endswith(".step")]


def test_cga_plan(run):
  config = run.config
  plan = stages.build_cga_plan(config, run)
  assert plan.seed == 2
  assert plan.total_steps == config.cga.epochs * run.steps_per_epoch  # no cooldown
  for count in (0, 10 ** 6):
    assert float(plan.schedule(jnp.asarray(count))) == pytest.approx(config.qat.min_lr)
  params = nnx.state(plan.student, nnx.Param)
  # A structure: the values come from the QAT checkpoint, so none is allocated here.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  opt_state = jax.eval_shape(plan.tx.init, params)
  assert isinstance(opt_state, cga.CGAState)
  assert "blocks.0.mlp.fc1.kernel" in opt_state.frozen and "total" in opt_state.frozen
  assert "blocks.0.attn.qk_product" not in opt_state.frozen  # derived: nothing to freeze


def test_num_train_steps_replaces_every_stage_length(run):
  config = digits_config(num_train_steps=5)
  short = stages.Run(config, run.workdir, run.source, run.mesh)
  for name, stage in stages.STAGES.items():
    assert stage.build(config, short).total_steps == 5, name
