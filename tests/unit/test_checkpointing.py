"""Model directories record the config that built them: a reader with another config is
refused with one line naming each key and both values, instead of silently re-quantizing
the stored weights (a W2A2 directory evaluated at 4 bits gave a plausible 93 % on digits)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ofq_jax import checkpointing, evaluate, export
from ofq_jax.errors import UserError
from ofq_jax.models import create_model, float_config, model_config


def _config(**quant):
  return model_config(None, embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=16,
                      num_classes=10, quant=dict(dict(enabled=True, weight_bits=2,
                                                      act_bits=2), **quant))


def _saved(tmp_path, config) -> str:
  directory = str(tmp_path / "models" / "cga")
  checkpointing.save_model_dir(directory, create_model(config, 0))
  return directory


def test_a_reader_with_other_bits_is_refused_before_restoring(tmp_path):
  directory = _saved(tmp_path, _config())
  assert checkpointing.model_dir_config(directory).quant.weight_bits == 2
  with pytest.raises(UserError) as error:
    checkpointing.load_model_dir(directory, create_model(_config(weight_bits=4, act_bits=4), 1))
  message = str(error.value)
  assert "model.quant.act_bits: 2 stored, 4 asked" in message
  assert "model.quant.weight_bits: 2 stored, 4 asked" in message
  assert "run.json" in message
  # The same through the loaders the evaluate and export commands use.
  with pytest.raises(UserError, match="weight_bits: 2 stored, 4 asked"):
    export.load_quantized_dir(directory, _config(weight_bits=4, act_bits=4))
  with pytest.raises(UserError, match="weight_bits: 2 stored, 4 asked"):
    evaluate.load_for_eval(directory, _config(weight_bits=4, act_bits=4))


def test_keys_that_do_not_change_the_stored_tensors_are_not_compared(tmp_path):
  """How a model runs (matmul, precision) or was drawn at quantize time is the reader's
  choice; the restored arrays are the saved ones."""
  config = _config()
  saved = create_model(config, 0)
  directory = str(tmp_path / "qat")
  checkpointing.save_model_dir(directory, saved)
  reader = _config(matmul="integer", matmul_operands="float32", attn_proj_init="pretrained")
  reader.precision = "default"
  loaded = checkpointing.load_model_dir(directory, create_model(reader, 1))
  np.testing.assert_array_equal(loaded.head.kernel[...], saved.head.kernel[...])


def test_a_float_directory_is_compared_without_its_quant_fields(tmp_path):
  """A float model's ``quant.*`` only says how it would be quantized later."""
  directory = _saved(tmp_path, float_config(_config()))
  checkpointing.load_model_dir(directory, create_model(float_config(_config(weight_bits=4)), 1))
  with pytest.raises(UserError, match="num_classes: 10 stored, 7 asked"):
    other = float_config(_config())
    other.num_classes = 7
    checkpointing.load_model_dir(directory, create_model(other, 1))
  with pytest.raises(UserError, match="holds a float model; export a quantized stage"):
    export.load_quantized_dir(directory, _config())


def test_directories_from_before_the_record_load_unchecked(tmp_path):
  directory = _saved(tmp_path, _config())
  os.remove(os.path.join(directory, checkpointing.MODEL_CONFIG_FILE))
  assert checkpointing.model_dir_config(directory) is None
  checkpointing.load_model_dir(directory, create_model(_config(weight_bits=4, act_bits=4), 1))
