"""The training system on digits with a tiny DeiT, on 8 fake CPU devices."""

import copy
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import set_fields
from ofq_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_OVERRIDES = {
    "model.embed_dim": 64, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 8,
    "model.img_size": 32, "data.image_size": 32, "batch_size": 16, "eval_batch_size": 120,
    "num_train_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 1,
    "tensorboard": False, "plots": False,
}


def digits_config(arg: str = "", **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return set_fields(module.get_config(arg), {**TINY_OVERRIDES, **overrides})


def read_metrics(workdir, stage=None):
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return [r for r in records if stage is None or r["stage"] == stage]


def losses_by_step(workdir, stage):
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir, stage) if "train/loss" in r}


@pytest.fixture(scope="module")
def float_teacher(tmp_path_factory) -> str:
  """An ofq_jax float model directory (1 float step) to start QAT runs from."""
  workdir = tmp_path_factory.mktemp("teacher")
  train.train_and_evaluate(digits_config(stages=("float",), num_train_steps=1), str(workdir))
  return str(workdir / "models" / "float")


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
    assert record["osc/flips"] == pytest.approx(sum(
        v for k, v in record.items() if k.startswith("osc/flips/")))
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
  from ofq_jax.models import create_model
  config = digits_config()
  config.model.quant.enabled = True
  params = {}
  for name, workdir in results.items():
    params[name] = export_ofq_torch(train.load_model(str(workdir / "models" / "qat"),
                                                     create_model(config.model)))
  for key, value in params["single"].items():
    np.testing.assert_allclose(params["mesh"][key], value, rtol=0, atol=1e-5, err_msg=key)


def cli(workdir, *extra, env=None, overrides=None, check=True):
  args = [sys.executable, "-m", "ofq_jax.main", f"--config={REPO / 'configs' / 'digits.py'}",
          f"--workdir={workdir}"]
  for key, value in {**TINY_OVERRIDES, **(overrides or {})}.items():
    args.append(f"--config.{key}={value}")
  run_env = dict(os.environ, **(env or {}))
  result = subprocess.run(args + list(extra), capture_output=True, text=True, env=run_env,
                          cwd=REPO, timeout=600, check=False)
  if check and result.returncode != 0:
    raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
  return result


def test_preemption_and_kill_resume_exactly(tmp_path, float_teacher):
  """A QAT run of 6 steps gets SIGTERM after step 2 (seen at step 3: saves it, exits 143),
  is SIGKILLed after step 4, then finishes: its losses equal an uninterrupted run's."""
  overrides = {"num_train_steps": 6, "stages": "('qat',)", "qat.teacher": float_teacher,
               "tracking.every_steps": 2, "qat.warmup_epochs": 0}
  workdir = tmp_path / "interrupted"
  term = cli(workdir, overrides=overrides, check=False, env={train.FAULT_ENV: "qat:2:term"})
  assert term.returncode == 143, term.stderr[-2000:]
  assert "SIGTERM: saved checkpoint 3" in term.stdout
  killed = cli(workdir, overrides=overrides, check=False, env={train.FAULT_ENV: "qat:4"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert "resumed from checkpoint 3" in killed.stdout
  finished = cli(workdir, overrides=overrides)
  assert "resumed from checkpoint 4" in finished.stdout
  config = digits_config(stages=("qat",), num_train_steps=6)
  config.qat.teacher = float_teacher
  config.tracking.every_steps = 2
  config.qat.warmup_epochs = 0
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  straight = losses_by_step(tmp_path / "straight", "qat")
  records = [r for r in read_metrics(workdir, "qat") if "train/loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for record in records:
    assert record["train/loss"] == pytest.approx(straight[record["step"]], abs=1e-6)
  # The oscillation history survives the checkpoints: flips at the tracked steps 4 and
  # 6 compare with levels stored before the interruptions.
  straight_records = {r["step"]: r for r in read_metrics(tmp_path / "straight", "qat")
                      if "train/loss" in r}
  for record in records:
    for key in ("osc/flips", "osc/oscillating_fraction"):
      assert record[key] == pytest.approx(straight_records[record["step"]][key], abs=1e-9)
  assert records[3]["osc/flips"] > 0 and records[2]["osc/flips"] == records[1]["osc/flips"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  """Two localhost processes (2 fake CPU devices each, gloo collectives), each reading its
  half of every batch: losses equal a single-process run on the same global batch."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  overrides = {"stages": "('float',)"}
  procs = []
  for pid in range(2):
    args = [sys.executable, "-m", "ofq_jax.main", f"--config={REPO / 'configs' / 'digits.py'}",
            f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={pid}", "--cpu_collectives=gloo"]
    args += [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **overrides}.items()]
    procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=REPO))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out + err[-3000:]
  config = digits_config(stages=("float",))
  config.mesh.data = 4
  train.train_and_evaluate(config, str(tmp_path / "single"))
  multi = losses_by_step(tmp_path / "multi", "float")
  single = losses_by_step(tmp_path / "single", "float")
  assert multi.keys() == single.keys() == {1, 2, 3}
  for step in single:
    assert multi[step] == pytest.approx(single[step], abs=1e-5)
  evals = [r for r in read_metrics(tmp_path / "multi") if "eval/top1" in r]
  single_eval = [r for r in read_metrics(tmp_path / "single") if "eval/top1" in r]
  assert evals[0]["eval/top1"] == pytest.approx(single_eval[0]["eval/top1"])
  assert list((tmp_path / "multi" / "checkpoints" / "float").iterdir())


def test_unknown_config_key_is_rejected(tmp_path):
  result = cli(tmp_path / "wd", overrides={"qat.learning_rate": 1.0}, check=False)
  assert result.returncode != 0
  assert "learning_rate" in result.stderr
  assert not (tmp_path / "wd").exists()


def test_batch_not_divisible_by_data_axis(tmp_path):
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 batch shards"):
    train.train_and_evaluate(digits_config(batch_size=12), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"model.quant.rules": (r"blocks\.7\..*=float",)},
     r"^error: quant.rules \['blocks\\\\.7\\\\..\*'\] match no layer"),
    ({"cga.targets": r"blocks\.\d+\.mlp\.fc3\.kernel"}, "cga.targets=.* matches no StatsQ"),
    ({"kd.teacher_logits": "clss"}, "kd.teacher_logits='clss' is not one of"),
    ({"model.quant.weight_bits": 9}, r"model.quant.weight_bits=9 is not an integer in \[2, 8\]"),
])
def test_quantized_stage_mistakes_fail_before_the_float_stage(tmp_path, overrides, match):
  """The quantized model's structure is checked up front (nnx.eval_shape): nothing is
  trained or written when a rule, a CGA target pattern or a KD option is wrong."""
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(digits_config(**overrides), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_missing_teacher_file(tmp_path):
  config = digits_config(stages=("qat",))
  config.qat.teacher = str(tmp_path / "deit_tiny.pth")
  with pytest.raises(FileNotFoundError, match="deit_tiny.pth.*does not exist"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  with pytest.raises(FileNotFoundError, match="add 'float' to config.stages"):
    train.train_and_evaluate(digits_config(stages=("qat",)), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  config = digits_config(stages=("float",))
  config.float.init_from = str(tmp_path / "deit_small.npz")
  with pytest.raises(FileNotFoundError, match="init_from=.*deit_small.npz.*does not exist"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


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
  with pytest.raises(FloatingPointError, match="loss is (nan|inf).*last good checkpoint"):
    train.train_and_evaluate(config, str(tmp_path))
  assert list((tmp_path / "checkpoints" / "float").iterdir())


def test_evaluate_every_checkpoint_kind(tmp_path, float_teacher):
  """ofq_jax model dirs, a timm-layout file and an OFQ-reference file give the top-1
  the training run measured."""
  from ofq_jax.evaluate import evaluate_checkpoint
  from ofq_jax.interop import export_ofq_torch, export_timm_deit
  from ofq_jax.models import create_model
  config = digits_config(stages=("qat",))
  config.qat.teacher = float_teacher
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  qat_dir = str(tmp_path / "run" / "models" / "qat")
  result = evaluate_checkpoint(config, qat_dir)
  assert result["kind"] == "ofq_jax quantized" and result["count"] == 360
  assert result["top1"] == pytest.approx(summary["qat_top1"])
  quantized = copy.deepcopy(config.model)
  quantized.quant.enabled = True
  model = train.load_model(qat_dir, create_model(quantized))
  np.savez(tmp_path / "ofq.npz", **export_ofq_torch(model))
  result = evaluate_checkpoint(config, str(tmp_path / "ofq.npz"))
  assert result["kind"] == "OFQ reference"
  assert result["top1"] == pytest.approx(summary["qat_top1"])
  float_result = evaluate_checkpoint(config, float_teacher)
  assert float_result["kind"] == "ofq_jax float"
  float_model = train.load_model(float_teacher, create_model(
      train.float_config(config.model)))
  np.savez(tmp_path / "deit.npz", **export_timm_deit(float_model))
  result = evaluate_checkpoint(config, str(tmp_path / "deit.npz"))
  assert result["kind"] == "timm / FB DeiT"
  assert result["top1"] == pytest.approx(float_result["top1"])
