"""A user's mistake stops before any work, naming the key, the value and the fix."""

import json

import pytest

from ofq_jax import run_record, train
from ofq_jax.errors import UserError
from support.runs import cli, digits_config


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


@pytest.mark.parametrize("workdir", ["a_file", "a_file/run"])
def test_a_workdir_that_cannot_be_a_directory(tmp_path, workdir):
  (tmp_path / "a_file").write_text("not a directory")
  with pytest.raises(UserError, match=r"workdir='.*' cannot be a run directory \((it|.*a_file)"
                                      r" is a file\); pass a directory path"):
    train.train_and_evaluate(digits_config(), str(tmp_path / workdir))
  assert (tmp_path / "a_file").read_text() == "not a directory"


def test_cga_resume_from_a_run_of_another_model(tmp_path):
  """A W2A2 QAT state resumed by a W4A4 CGA config would restore (same shapes) and anneal
  at the wrong bit-width: the other run's record refuses it before any work."""
  other = tmp_path / "other"
  run_record.write(digits_config(), str(other))
  (other / "checkpoints" / "qat").mkdir(parents=True)
  (other / "models" / "float").mkdir(parents=True)

  def cga_config(arg=""):
    config = digits_config(arg, stages=("cga",))
    config.cga.resume = str(other / "checkpoints" / "qat")
    config.qat.teacher = str(other / "models" / "float")
    return config
  config = cga_config("bits=4")
  with pytest.raises(UserError, match=r"cga.resume=.* holds a QAT state of another model "
                     r"\(model.quant.act_bits: 2 stored, 4 asked; model.quant.weight_bits: 2 "
                     r"stored, 4 asked; recorded in .*other/run.json\)"):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  train.preflight(cga_config(), str(tmp_path / "wd"))  # the same model passes


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


@pytest.mark.parametrize("config_arg,overrides,names", [
    (":bits=two", {}, "bits='two' is not an int"),
    ("", {"qat.lrr": 3}, "--config.qat.lrr: the config has no key 'lrr'. Did you mean \"lr\""),
    ("", {"model.quant.weight_bits": 1}, "model.quant.weight_bits=1 is not an integer in [2, 8]"),
    ("", {"stages": "('qat',)", "qat.teacher": "/nonexistent/deit.pth"},
     "config.qat.teacher='/nonexistent/deit.pth' does not exist"),
    ("", {"batch_size": 12}, "batch_size=12 is not divisible by the 8 batch shards"),
    ("", {"qat.lr": -1}, "qat.lr=-1"),  # a declared range (config_keys): once accepted
])
def test_cli_user_errors_are_one_line(tmp_path, config_arg, overrides, names):
  """The command line prints one ``error:`` line (no traceback), exits 2, writes nothing."""
  result = cli(tmp_path / "wd", overrides=overrides, check=False, config_arg=config_arg)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  assert names in lines[0]
  assert not (tmp_path / "wd").exists()


def test_resume_refuses_a_different_run(tmp_path):
  """A workdir holds one run: a rerun that changes its trajectory (here the learning rate
  and the seed) is refused before anything is written, listing each key with both values;
  a change of cadence or of the stages to run is accepted."""
  config = digits_config(stages=("float",), num_train_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  record = (tmp_path / "run.json").read_text()
  metrics = (tmp_path / "metrics.jsonl").read_text()
  changed = digits_config(stages=("float",), num_train_steps=2, seed=7)
  changed.float.lr = 2 * config.float.lr
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(changed, str(tmp_path))
  message = str(error.value)
  assert f"float.lr: {config.float.lr!r} -> {changed.float.lr!r}" in message
  assert "seed: 0 -> 7" in message and "log_every_steps" not in message
  assert (tmp_path / "run.json").read_text() == record
  assert (tmp_path / "metrics.jsonl").read_text() == metrics
  cadence = digits_config(stages=("float",), num_train_steps=2, log_every_steps=5,
                          eval_batch_size=40, checkpoint_every_steps=7)
  summary = train.train_and_evaluate(cadence, str(tmp_path))  # complete: nothing to train
  assert summary["float_top1"] == pytest.approx(
      json.loads(metrics.splitlines()[-1])["eval/top1"])
