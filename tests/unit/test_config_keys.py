"""Config keys declared once (``ofq_jax.config_keys``, ``models/quant_keys.py``): the
defaults, checks, storage-blind keys and run-record exemptions derive from them."""

import dataclasses

import ml_collections
import pytest

from ofq_jax import config_keys, recipes, run_record
from ofq_jax.errors import UserError
from ofq_jax.models import config as deit_config
from ofq_jax.models import quant_keys, swin


@pytest.mark.parametrize("family,build", [("deit", deit_config.model_config),
                                          ("swin", swin.model_config)])
def test_each_family_gets_every_declared_key_at_its_default(family, build):
  quant = build("tiny").quant
  declared = [k for k in quant_keys.QUANT_KEYS if not k.families or family in k.families]
  assert list(quant.keys()) == sorted(k.name for k in declared)
  for key in declared:
    assert quant[key.name] == key.default, key.name
    assert key.problem(key.default) is None, key.name  # a default passes its own check


def test_storage_blind_keys_are_the_declared_ones():
  blind = {k for k in deit_config.STORAGE_BLIND_KEYS if k.startswith("quant.")}
  assert blind == {f"quant.{k.name}" for k in quant_keys.QUANT_KEYS if not k.stored}
  assert {"quant.weight_bits", "quant.attention", "quant.rules"}.isdisjoint(blind)


def test_run_record_exempts_the_keys_declared_not_to_change_a_run():
  for key in config_keys.TRAINING_KEYS:
    assert (key.name in run_record.EXEMPT) == (not key.run), key.name


@pytest.mark.parametrize("family,field,value,says", [
    ("deit", "weight_bits", 9, "model.quant.weight_bits=9 is not an integer in [2, 8]"),
    ("swin", "act_bits", 1, "model.quant.act_bits=1 is not an integer in [2, 8]"),
    ("deit", "attention", "linear", "model.quant.attention='linear' is not one of"),
    ("deit", "lsq_grad_batch", 0, "model.quant.lsq_grad_batch=0 is not an integer >= 1"),
    ("deit", "enabled", "yes", "model.quant.enabled='yes' is not True or False"),
    ("swin", "position_table_init", "copy", "position_table_init='copy' is not one of"),
])
def test_a_bad_quant_value_is_one_line_naming_key_value_and_fix(family, field, value, says):
  quant = quant_keys.quant_defaults(family)
  with quant.ignore_type():
    quant[field] = value
  with pytest.raises(UserError) as error:
    quant_keys.check_quant(quant, family)
  assert says in str(error.value) and f"fix: --config.model.quant.{field}=<" in str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("key,value,says", [
    ("qat.lr", -1.0, "qat.lr=-1.0 is not a number >= 0 (the peak learning rate)"),
    ("float.epochs", 2.5, "float.epochs=2.5 is not an integer >= 0"),
    ("cga.boundary_range", 0.0, "cga.boundary_range=0.0 is not a number in (0, 0.5]"),
    ("optim.b2", 1.5, "optim.b2=1.5 is not a number in [0, 1]"),
    ("optim.eps", 0.0, "optim.eps=0.0 is not a number > 0"),
    ("batch_size", 0, "batch_size=0 is not an integer >= 1"),
    ("label_smoothing", float("nan"), "label_smoothing=nan is not a number in [0, 1]"),
])
def test_training_keys_out_of_range_are_refused(key, value, says):
  config = recipes.digits()
  *parents, leaf = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(UserError, match="^" + says.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    config_keys.check_training(config)


def test_every_recipe_is_in_range():
  for model, bits in recipes.IMAGENET:
    for stage in ("qat", "cga"):
      config_keys.check_training(recipes.imagenet(model, bits, stage))
  for method in ("float", "lsq", "statsq", "ofq"):
    config_keys.check_training(recipes.digits(method=method))


def test_a_key_a_config_lacks_is_not_checked():
  block = ml_collections.ConfigDict({"lr": 0.1})
  config_keys.check(block, [config_keys.Key("epochs", "x", kind=int, low=0),
                            dataclasses.replace(config_keys.TRAINING_KEYS[2], name="lr")], "qat.")
