"""Training runs on digits with a tiny DeiT, on 8 fake CPU devices: every stage, the
mesh, checkpoints that cannot be read, a diverging loss, and evaluation of every kind of
checkpoint."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from ofq_jax import train
from ofq_jax.checkpointing import load_model_dir
from ofq_jax.errors import DivergedError
from ofq_jax.models import create_model, float_config
from support import REPO
from support.runs import digits_config, read_metrics


def test_all_stages_three_steps(tmp_path):
  config = digits_config(tensorboard=True, plots=True)
  summary = train.train_and_evaluate(config, str(tmp_path))
  for name in ("oscillation.png", "scales_block0.png", "accuracy.png"):
    assert (tmp_path / "plots" / name).stat().st_size > 10_000, name
  # The plots command redraws from metrics.jsonl alone, e.g. for another block.
  redraw = subprocess.run([sys.executable, "-m", "ofq_jax.plots", f"--workdir={tmp_path}",
                           "--block=1"], capture_output=True, text=True, cwd=REPO, check=False)
  assert redraw.returncode == 0, redraw.stderr[-2000:]
  assert (tmp_path / "plots" / "scales_block1.png").exists()
  for key in ("float_top1", "qat_top1", "cga_top1", "frozen_fraction", "wall_seconds"):
    assert key in summary
  assert 0.0 < summary["frozen_fraction"] <= 1.0
  for stage in ("qat", "cga"):
    assert 0.0 <= summary[f"oscillating_fraction_{stage}"] <= 1.0
    # Totals and module types under both flip definitions; no per-tensor numbers.
    oscillation = summary[f"oscillation_{stage}"]
    assert oscillation["osc/oscillating_fraction"] == summary[f"oscillating_fraction_{stage}"]
    for prefix in ("osc", "osc_grid"):
      for group in ("qk", "v", "proj", "fc1", "fc2", "qk_implied"):
        assert 0.0 <= oscillation[f"{prefix}/oscillating_fraction/group/{group}"] <= 1.0
      assert f"{prefix}/oscillating_fraction_w2" in oscillation
    assert not any(".kernel" in k or "qk_product" in k for k in oscillation)
  assert json.loads((tmp_path / "summary.json").read_text())["cga_top1"] == summary["cga_top1"]
  records = read_metrics(tmp_path)
  for stage in ("float", "qat", "cga"):
    steps = [r for r in records if r["stage"] == stage and "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec"):
      assert all(np.isfinite(r[key]) for r in steps), key
    evals = [r for r in records if r["stage"] == stage and "eval/top1" in r]
    assert len(evals) == 1 and 0 <= evals[0]["eval/top5"] <= 100
  cga_steps = [r for r in records if r["stage"] == "cga" and "train/loss" in r]
  assert all(0 < r["train/frozen_fraction"] <= 1 for r in cga_steps)
  assert any(k.startswith("cga/frozen/blocks.0.mlp.fc1") for k in cga_steps[0])
  assert all(r["train/lr"] == pytest.approx(config.qat.min_lr) for r in cga_steps)
  qat_steps = [r for r in records if r["stage"] == "qat" and "train/loss" in r]
  for record in qat_steps + cga_steps:  # oscillation and scales, per layer and in total
    assert 0.0 <= record["osc/oscillating_fraction"] <= 1.0
    tensors = {k: v for k, v in record.items() if k.startswith("osc/flips/")
               and k.count("/") == 2 and not k.endswith((".q_kernel", ".k_kernel"))}
    groups = {k: v for k, v in record.items() if k.startswith("osc/flips/group/")
              and not k.endswith("/qk_implied")}
    assert record["osc/flips"] == pytest.approx(sum(tensors.values()))
    assert record["osc/flips"] == pytest.approx(sum(groups.values()))
    for name in ("blocks.1.attn.qk_product", "blocks.0.mlp.fc2.kernel", "head.kernel"):
      assert 0.0 <= record[f"osc/oscillating_fraction/{name}"] <= 1.0
      assert 0 < record[f"scale/min/{name}"] <= record[f"scale/max/{name}"]
  scale_records = [r for r in records if "scales/blocks.0.attn.qk_product" in r]
  assert {r["stage"] for r in scale_records} == {"qat", "cga"}
  assert len(scale_records[0]["scales/blocks.0.attn.qk_product"]) == 2 * 64  # heads x D
  assert len(scale_records[0]["scales/blocks.0.mlp.fc1.kernel"]) == 4 * 64
  assert list((tmp_path / "tensorboard" / "qat").glob("events.out.tfevents*"))
  for stage in ("float", "qat", "cga"):
    assert (tmp_path / "models" / stage).is_dir()
  # A second call finds every stage complete and reproduces the summary.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["cga_top1"] == summary["cga_top1"]


def test_one_device_and_four_by_two_mesh_agree(tmp_path, float_teacher):
  """QAT (calibration, KD teacher, quantized student) on 1 device and on a 4x2
  data x fsdp mesh whose fsdp axis shards parameters and optimizer state."""
  results = {}
  for name, mesh in (("single", dict(data=1, fsdp=1)), ("mesh", dict(data=4, fsdp=2))):
    config = digits_config(stages=("qat",), fsdp_min_size=256)
    config.qat.teacher = float_teacher
    config.mesh.update(mesh)
    train.train_and_evaluate(config, str(tmp_path / name))
    results[name] = tmp_path / name
  single = read_metrics(results["single"], "qat")
  sharded = read_metrics(results["mesh"], "qat")
  assert [r["step"] for r in single if "train/loss" in r] == [1, 2, 3]
  for one, two in zip(single, sharded):
    assert one.keys() == two.keys()
    assert two["step"] == one["step"]
    for key in one:
      if key.startswith(("train/loss", "scale/")):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key
    # The tracker's state is fsdp-sharded with the weights; its counts agree up to the
    # odd weight that sits within float noise of a rounding threshold.
    if "osc/flips" in one:
      assert abs(two["osc/flips"] - one["osc/flips"]) <= 2
  from ofq_jax.interop import export_ofq_torch
  config = digits_config()
  config.model.quant.enabled = True
  params = {}
  for name, workdir in results.items():
    params[name] = export_ofq_torch(load_model_dir(str(workdir / "models" / "qat"),
                                                   create_model(config.model)))
  for key, value in params["single"].items():
    np.testing.assert_allclose(params["mesh"][key], value, rtol=0, atol=1e-5, err_msg=key)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
  config = digits_config(stages=("float",), num_train_steps=4)
  train.train_and_evaluate(config, str(tmp_path))
  newest = tmp_path / "checkpoints" / "float" / "4"
  for path in sorted(newest.rglob("*")):
    if path.is_file():
      path.write_bytes(b"garbage")
  capsys.readouterr()
  summary = train.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "Checkpoint 4" in out and "falling back to checkpoint 3" in out
  assert "resumed from checkpoint 3" in out
  assert np.isfinite(summary["float_top1"])


def test_nan_loss_stops_with_a_clear_message(tmp_path):
  config = digits_config(stages=("float",), num_train_steps=5)
  config.float.lr = 1e30
  config.float.warmup_epochs = 0
  with pytest.raises(DivergedError, match="loss is (nan|inf).*last good checkpoint"):
    train.train_and_evaluate(config, str(tmp_path))
  assert list((tmp_path / "checkpoints" / "float").iterdir())


def test_evaluate_every_checkpoint_kind(tmp_path, float_teacher):
  """ofq_jax model dirs, a timm-layout file, an OFQ-reference file and a packed integer
  export give the top-1 the training run measured."""
  from ofq_jax import export
  from ofq_jax.evaluate import evaluate_checkpoint
  from ofq_jax.interop import export_ofq_torch, export_timm_deit
  config = digits_config(stages=("qat",))
  config.qat.teacher = float_teacher
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  qat_dir = str(tmp_path / "run" / "models" / "qat")
  result = evaluate_checkpoint(config, qat_dir)
  assert result["kind"] == "ofq_jax quantized" and result["count"] == 360
  assert result["top1"] == pytest.approx(summary["qat_top1"])
  quantized = copy.deepcopy(config.model)
  quantized.quant.enabled = True
  model = load_model_dir(qat_dir, create_model(quantized))
  np.savez(tmp_path / "ofq.npz", **export_ofq_torch(model))
  result = evaluate_checkpoint(config, str(tmp_path / "ofq.npz"))
  assert result["kind"] == "OFQ reference"
  assert result["top1"] == pytest.approx(summary["qat_top1"])
  export.export_integer(model, tmp_path / "packed.safetensors")
  result = evaluate_checkpoint(config, str(tmp_path / "packed.safetensors"))
  assert result["kind"] == "packed integer" and result["count"] == 360
  # Its logits equal the fake-quant ones to 1e-5: at most a near-tie image may flip.
  assert result["top1"] == pytest.approx(summary["qat_top1"], abs=100 / 360 + 1e-9)
  float_result = evaluate_checkpoint(config, float_teacher)
  assert float_result["kind"] == "ofq_jax float"
  float_model = load_model_dir(float_teacher, create_model(float_config(config.model)))
  np.savez(tmp_path / "deit.npz", **export_timm_deit(float_model))
  result = evaluate_checkpoint(config, str(tmp_path / "deit.npz"))
  assert result["kind"] == "timm / FB DeiT"
  assert result["top1"] == pytest.approx(float_result["top1"])
