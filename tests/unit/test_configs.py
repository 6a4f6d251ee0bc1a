"""Every file in configs/ loads; the model config's argument string is honoured."""

import importlib.util

import pytest

from support import REPO

CONFIGS = sorted((REPO / "configs").glob("*.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_files_load(path):
  assert load(path).get_config() is not None


def test_deit_model_arguments():
  module = load(CONFIGS[[p.stem for p in CONFIGS].index("deit_model")])
  config = module.get_config("size=small,bits=3,attention=standard,method=lsq")
  assert config.embed_dim == 384 and config.quant.enabled
  assert (config.quant.weight_bits, config.quant.attention, config.quant.weight_method) == (
      3, "standard", "lsq")
  assert not module.get_config("bits=0").quant.enabled
  with pytest.raises(ValueError, match="^configs/deit_model.py: unknown argument 'depth'"):
    module.get_config("depth=3")
  with pytest.raises(ValueError, match="not key=value"):
    module.get_config("small")


@pytest.mark.parametrize("method,stages,weights,attention", [
    ("float", ("float",), "statsq", "qkr"),
    ("lsq", ("float", "qat"), "lsq", "standard"),
    ("statsq", ("float", "qat"), "statsq", "standard"),
    ("statsq_qkr", ("float", "qat"), "statsq", "qkr"),
    ("ofq", ("float", "qat", "cga"), "statsq", "qkr"),
])
def test_digits_method_argument(method, stages, weights, attention):
  module = load(CONFIGS[[p.stem for p in CONFIGS].index("digits")])
  config = module.get_config(f"method={method},bits=3,seed=2")
  assert tuple(config.stages) == stages and config.method == method and config.seed == 2
  quant = config.model.quant
  assert (quant.weight_method, quant.attention, quant.weight_bits, quant.act_bits) == (
      weights, attention, 3, 3)
  assert config.tracking.enabled


def test_digits_rejects_an_unknown_method():
  module = load(CONFIGS[[p.stem for p in CONFIGS].index("digits")])
  with pytest.raises(ValueError, match="method='adaround' is not one of"):
    module.get_config("method=adaround")
