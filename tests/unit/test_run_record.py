"""workdir/run.json: which changes make a different run (ofq_jax.run_record)."""

import json

import pytest

from ofq_jax import run_record
from ofq_jax.errors import UserError
from ofq_jax.recipes import digits


def test_flatten_reads_back_as_json():
  flat = run_record.flatten(digits())
  assert flat["qat.lr"] == digits().qat.lr
  assert flat["stages"] == ["float", "qat", "cga"]  # tuples come back as lists
  assert flat["model.quant.weight_bits"] == 2


def test_differences_list_trajectory_keys_only():
  old = run_record.flatten(digits())
  new = dict(old, **{"qat.lr": 1.0, "seed": 3, "log_every_steps": 1, "mesh.data": 2,
                     "stages": ["cga"], "data.data_dir": "/elsewhere",
                     "tracking.scales_every_steps": 0})
  new["brand_new_key"] = 1
  assert run_record.differences(old, new) == [
      "brand_new_key: '<absent>' -> 1", f"qat.lr: {old['qat.lr']!r} -> 1.0", "seed: 0 -> 3"]


def test_check_refuses_then_write_records(tmp_path):
  config = digits()
  run_record.check(config, str(tmp_path))  # an empty workdir: anything goes
  run_record.write(config, str(tmp_path))
  assert json.loads((tmp_path / "run.json").read_text()) == run_record.flatten(config)
  config.log_every_steps = 1
  run_record.check(config, str(tmp_path))
  config.model.quant.weight_bits = 4
  with pytest.raises(UserError, match=r"model.quant.weight_bits: 2 -> 4.*new --workdir"):
    run_record.check(config, str(tmp_path))


def test_check_workdir_walks_up_to_an_existing_directory(tmp_path, monkeypatch):
  """A relative path whose parents do not exist yet is fine (it is created); one under a
  file is not, whichever ancestor the file is."""
  monkeypatch.chdir(tmp_path)
  run_record.check_workdir("runs/w2a2/seed0")
  (tmp_path / "runs").write_text("a file")
  with pytest.raises(UserError, match=r"workdir='runs/w2a2/seed0' cannot be a run directory "
                                      r"\(.*/runs is a file\)"):
    run_record.check_workdir("runs/w2a2/seed0")
  with pytest.raises(UserError, match=r"workdir='runs' cannot be a run directory \(it is a file\)"):
    run_record.check_workdir("runs")
