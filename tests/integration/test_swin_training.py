"""``configs/digits.py:arch=swin``: the tiny Swin through QAT -> CGA (3 steps per stage,
from a random float Swin saved as a model directory), with the tracker, CGA on the QKR
Swin's targets plus W_qk (``cga.include_qk``: the CGA stage starts from the QAT
checkpoint in QKR's product form) and the plots, and its model directories read back by
``ofq_jax.evaluate`` as Swin models. One run covers both, since the compilation
dominates its time."""

import numpy as np

from ofq_jax import evaluate, train
from ofq_jax.checkpointing import save_model_dir
from ofq_jax.models import create_model, float_config, swin
from support.runs import SWIN_TINY_OVERRIDES, load_config_file, read_metrics, set_fields


def test_swin_digits_all_stages(tmp_path):
  config = set_fields(load_config_file("digits").get_config("arch=swin"),
                      {**SWIN_TINY_OVERRIDES, "cga.include_qk": True})
  # A random float Swin as the teacher: the float stage's training is DeiT's code path
  # (tested there); this test is about the quantized stages.
  teacher = tmp_path / "teacher"
  save_model_dir(str(teacher), create_model(float_config(config.model)))
  config.stages, config.qat.teacher = ("qat", "cga"), str(teacher)
  summary = train.train_and_evaluate(config, str(tmp_path))
  for key in ("qat_top1", "cga_top1", "frozen_fraction"):
    assert key in summary
  assert 0.0 < summary["frozen_fraction"] <= 1.0
  records = read_metrics(tmp_path)
  cga_steps = [r for r in records if r["stage"] == "cga" and "train/loss" in r]
  assert [r["step"] for r in cga_steps] == [1, 2, 3]
  frozen = {k for k in cga_steps[0] if k.startswith("cga/frozen/")}
  for name in ("stages.0.0.mlp.fc1.kernel", "stages.0.1.attn.v_kernel",
               "stages.1.0.attn.proj.kernel", "merges.0.reduction.kernel",
               "stages.0.0.attn.qk_kernel", "stages.1.0.attn.qk_kernel"):
    assert f"cga/frozen/{name}" in frozen, sorted(frozen)
  for record in cga_steps:
    assert 0.5 < record["cga/frozen/stages.0.1.attn.qk_kernel"] <= 1.0
    assert 0.0 <= record["osc/oscillating_fraction/stages.0.1.attn.qk_product"] <= 1.0
  qat_steps = [r for r in records if r["stage"] == "qat" and "train/loss" in r]
  assert all(np.isfinite(r["train/loss"]) for r in qat_steps)
  assert 0.0 <= qat_steps[-1]["osc/oscillating_fraction/stages.0.1.attn.qk_product"] <= 1.0
  assert (tmp_path / "plots" / "scales_block0.png").stat().st_size > 10_000
  model, kind = evaluate.load_for_eval(str(tmp_path / "models" / "cga"), config.model)
  assert kind == "ofq_jax quantized (W_qk form)" and isinstance(model, swin.SwinTransformer)
  qat_model, kind = evaluate.load_for_eval(str(tmp_path / "models" / "qat"), config.model)
  assert kind == "ofq_jax quantized" and qat_model.stages[0][0].attn.qk_kernel is None
  float_model, kind = evaluate.load_for_eval(str(teacher), config.model)
  assert kind == "ofq_jax float" and float_model.merges[0].reduction.bias is None
