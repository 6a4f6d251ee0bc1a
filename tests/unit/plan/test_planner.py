"""Plans of tiny DeiTs and Swins: each stage's real train step, built abstractly and
compiled for 4- and 8-chip TPU topologies with data and fsdp axes (``ofq_jax.plan``)."""

import re

import jax
import numpy as np
import pytest

from ofq_jax.errors import UserError
from ofq_jax.plan import planner, report

from support.runs import SWIN_TINY_OVERRIDES, digits_config

TINY = {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2, "model.patch_size": 8,
        "model.img_size": 16, "data.image_size": 16, "fsdp_min_size": 64,
        "num_train_steps": -1}
"""A one-block DeiT on 16 px digits: each stage compiles for a TPU in seconds."""
SWIN = {**SWIN_TINY_OVERRIDES, "model.depths": (2,), "model.num_heads": (2,),
        "fsdp_min_size": 64, "num_train_steps": -1}
INT8_DOT = re.compile(r"= s32\[[^\]]*\][^ ]* convolution\(")


def tiny(fsdp: int = 1, **overrides):
  config = digits_config(**{**TINY, **overrides})
  config.mesh.fsdp = fsdp
  return config


@pytest.fixture(name="compiled")
def keep_compiled(monkeypatch):
  """Every program the planner compiles, in order."""
  kept = []
  real = planner._compile  # pylint: disable=protected-access

  def keep(traced):
    result = real(traced)
    kept.append(result[0])
    return result
  monkeypatch.setattr(planner, "_compile", keep)
  return kept


def test_every_stage_compiles_abstractly_with_data_and_fsdp_axes(compiled):
  """float, QAT and CGA for v5e:2x2 as data=2 x fsdp=2; nothing the size of a parameter
  is allocated on the host's devices; the numbers are the compiled steps' own."""
  before = {id(a) for a in jax.live_arrays()}
  plan = planner.plan(tiny(fsdp=2), "v5e:2x2", stage_names=("float", "qat", "cga"),
                      per_chip_batch=2)
  made = [a for a in jax.live_arrays() if id(a) not in before]
  assert not [a.shape for a in made if a.size > 64], "a plan allocated arrays"
  assert plan.mesh_shape == (2, 2) and [s.stage for s in plan.stages] == ["float", "qat", "cga"]
  for stage, program in zip(plan.stages, compiled):
    analysis, cost = program.memory_analysis(), program.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert stage.memory.temporaries == analysis.temp_size_in_bytes
    assert stage.memory.arguments == analysis.argument_size_in_bytes
    assert (stage.flops, stage.bytes) == (cost["flops"], cost["bytes accessed"])
    entry = report.as_dict(plan)["stages"][plan.stages.index(stage)]
    assert entry["bytes_per_image"] == cost["bytes accessed"] / 2
    assert stage.fits and stage.global_batch == 8 and stage.steps > 0
    assert stage.fsdp_sharded and {c.kind for c in stage.collectives} >= {"all-gather"}
    assert stage.roofline.step_seconds == max(stage.roofline.matrix_seconds,
                                              stage.roofline.memory_seconds)
  assert plan.hours == pytest.approx(sum(s.steps * s.roofline.step_seconds
                                         for s in plan.stages) / 3600)
  # quant.matmul='auto' is integer on a TPU: int8 x int8 -> int32 dots, as the census says.
  qat = plan.stages[1]
  assert INT8_DOT.search(compiled[1].as_text()) and qat.dots.share("int8") > 0.2
  assert not INT8_DOT.search(compiled[0].as_text())  # the float stage has none
  # ... and the plan lists each product's path: int8 everywhere but the patch embedding.
  paths = {d.product: d for d in qat.products}
  assert not plan.stages[0].products and "blocks.0.attn.logits" in paths
  assert paths["patch_embed"].plan is None and "per pixel" in paths["patch_embed"].why
  assert all(d.plan.operand == "int8" for name, d in paths.items() if name != "patch_embed")
  assert "integer products  9 of 10 on integer levels" in report.as_text(plan)


def test_fsdp_divides_the_arguments_per_chip():
  """On 8 chips (v5e:2x4), fsdp=4 holds about a quarter of the parameters and moments."""
  wide = {"model.embed_dim": 128, "model.num_heads": 4}  # parameters outweigh the rest
  one = planner.plan(tiny(fsdp=1, **wide), "v5e:2x4", stage_names=("qat",), per_chip_batch=1)
  four = planner.plan(tiny(fsdp=4, **wide), "v5e:2x4", stage_names=("qat",),
                      per_chip_batch=1)
  ratio = four.stages[0].memory.arguments / one.stages[0].memory.arguments
  assert 0.2 < ratio < 0.4, ratio
  assert not one.stages[0].fsdp_sharded and four.stages[0].fsdp_sharded


@pytest.mark.parametrize("topology, fsdp", [("v5e:2x2", 2), ("v5p:2x2x2", 4)])
def test_swin_plans(topology, fsdp):
  config = digits_config("arch=swin", **SWIN)
  config.mesh.fsdp = fsdp
  plan = planner.plan(config, topology, stage_names=("qat",), per_chip_batch=1)
  stage = plan.stages[0]
  assert stage.fits and stage.dots.share("int8") > 0 and stage.fsdp_sharded
  assert plan.mesh_shape == (len(plan.topology.devices) // fsdp, fsdp)


def test_the_recipe_is_every_stage_with_steps(compiled):
  """Without float epochs the recipe is QAT and CGA; with ``quant.matmul='fake'`` (the
  reference's float32 fake-quant) no dot is int8, nearly all are float32 'highest'."""
  config = tiny(**{"model.quant.matmul": "fake"})
  config.float.epochs = 0
  plan = planner.plan(config, "v5e:2x2", per_chip_batch=1)
  assert [s.stage for s in plan.stages] == ["qat", "cga"]
  assert not any(INT8_DOT.search(program.as_text()) for program in compiled)
  assert plan.stages[0].dots.share("int8") == 0
  assert plan.stages[0].dots.share("f32 highest") > 0.9
  text = report.as_text(plan)
  for stage in plan.stages:  # the table prints what the JSON holds
    assert f"{stage.compile_seconds:.0f} s" in text
    assert f"{stage.memory.total / 1e9:.2f} GB" in text


@pytest.mark.parametrize("overrides, kwargs, says", [
    ({}, dict(per_chip_batch=0), "--per_chip_batch=0 must be at least 1"),
    ({"batch_size": 6}, {}, "batch_size=6 does not split over the 4 devices"),
    ({}, dict(stage_names=("qat", "polish")), r"\['polish'\] not among"),
    ({"mesh.fsdp": 3}, {}, "mesh.fsdp=3 must divide the 4 devices"),
])
def test_mistakes_are_one_error_line_before_any_compile(overrides, kwargs, says, compiled):
  config = tiny()
  for key, value in overrides.items():
    node, leaf = (config.mesh, "fsdp") if key == "mesh.fsdp" else (config, key)
    node[leaf] = value
  with pytest.raises(UserError, match=says):
    planner.plan(config, "v5e:2x2", **kwargs)
  assert not compiled


@pytest.mark.parametrize("start, bump, largest", [(8, 0, 36), (8, 2 * 10 ** 9, 32),
                                                   (50, 0, 36), (50, 2 * 10 ** 9, 32)])
def test_fit_finds_the_edge_in_a_handful_of_compiles(monkeypatch, start, bump, largest):
  """``largest_batch`` on a stand-in compile whose HBM is 1 GB + 0.3 GB per image, with a
  step of ``bump`` at 33 images that the line does not predict, from a batch that fits or
  not: the answer is the largest batch that fits (by hand: 12 GB at 36, or 32 with the
  step), within six compiles."""
  capacity = 12 * 10 ** 9
  hbm = lambda b: 10 ** 9 + 3 * 10 ** 8 * b + (bump if b >= 33 else 0)
  calls = []

  def fake_compile(config, name, topology, mesh, batch):
    del config, name, topology, mesh
    calls.append(batch)
    return _report(batch, hbm(batch), capacity)
  monkeypatch.setattr(planner, "compile_stage", fake_compile)
  found = planner.largest_batch(None, "qat", None, None, _report(start, hbm(start), capacity),
                                lambda _: None)
  assert found == largest == max(b for b in range(1, 100) if hbm(b) <= capacity)
  assert len(calls) <= 6, calls


def _report(batch: int, total: int, capacity: int) -> planner.StageReport:
  from ofq_jax.plan import census, program  # pylint: disable=import-outside-toplevel
  return planner.StageReport(
      "qat", batch, batch, program.Memory(0, 0, 0, total, 0), capacity,
      census.DotCensus({}, {}), 1, 1, (), 0, 0.0)


def test_refused_compiles_report_what_libtpu_asked_for(monkeypatch):
  """A step libtpu refuses (it does not fit at all) is a plan line, not a traceback."""
  needed = int(20.5 * 2 ** 30)
  monkeypatch.setattr(planner, "_compile", lambda traced: (None, (
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM", needed)))
  plan = planner.plan(tiny(), "v5e:2x2", stage_names=("qat",), per_chip_batch=1)
  stage = plan.stages[0]
  assert not stage.fits and stage.memory.temporaries == needed and stage.roofline is None
  assert "DOES NOT FIT: RESOURCE_EXHAUSTED" in report.as_text(plan)
  assert report.as_dict(plan)["stages"][0]["refused"].startswith("RESOURCE_EXHAUSTED")
  assert np.isnan(plan.hours)
