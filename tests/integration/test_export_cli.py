"""The export command on a digits-trained model: the packed file's logits equal the
trained model's fake-quant eval logits; its user errors are one line each, found before
the model is read."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from ofq_jax import export, train
from ofq_jax.checkpointing import load_model_dir
from ofq_jax.data import build
from ofq_jax.models import create_model, quantized_config
from support import REPO
from support.runs import TINY_OVERRIDES, digits_config


def test_export_command_on_a_digits_model(tmp_path, float_teacher):
  config = digits_config(stages=("qat",), num_train_steps=3)
  config.qat.teacher = float_teacher
  train.train_and_evaluate(config, str(tmp_path / "run"))
  model_dir = tmp_path / "run" / "models" / "qat"
  out = tmp_path / "digits_w2a2.safetensors"
  args = [sys.executable, "-m", "ofq_jax.export", f"--config={REPO / 'configs' / 'digits.py'}",
          f"--checkpoint={model_dir}", f"--out={out}"]
  args += [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items() if k.startswith("model.")]
  result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "MB packed weights" in result.stdout
  model = load_model_dir(str(model_dir), create_model(quantized_config(config.model)))
  images = jnp.asarray(next(build(config.data).eval_batches(
      global_batch=120, process_index=0, process_count=1))["image"])
  np.testing.assert_allclose(export.load_integer(out, config.model)(images),
                             model(images, train=False), rtol=0, atol=1e-5)
  missing = subprocess.run(args[:4] + [f"--checkpoint={tmp_path / 'nope'}", f"--out={out}"],
                           capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
      f"error: --checkpoint={str(tmp_path / 'nope')!r} is not a model directory "
      "(workdir/models/qat or models/cga)."]

  def one_error_line(*extra) -> str:
    result = subprocess.run(args[:4] + [f"--checkpoint={model_dir}", *extra], capture_output=True,
                            text=True, cwd=REPO, timeout=600, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]
  other_bits = one_error_line(f"--out={tmp_path / 'w4.safetensors'}", *args[6:],
                              "--config.model.quant.weight_bits=4")
  assert "model.quant.weight_bits: 2 stored, 4 asked" in other_bits, other_bits
  no_dir = one_error_line(f"--out={tmp_path / 'no_dir' / 'x.safetensors'}", *args[6:])
  assert no_dir.startswith("error: --out=") and "does not exist" in no_dir, no_dir
  assert not (tmp_path / "w4.safetensors").exists()
