"""Model-only config for notebooks and scripts: a DeiT preset, optionally quantized.

  from ml_collections import config_flags  # or, in Python:
  from configs import deit_model; config = deit_model.get_config("size=small,bits=2")

Argument string (big_vision style, comma separated): ``size`` (tiny|small|base),
``bits`` (weight and activation bits; 0 = float), ``attention`` (qkr|standard),
``method`` (statsq|lsq). The training configs (``configs/digits.py`` and the
ImageNet recipes) embed this under ``config.model``.
"""

import ml_collections

from ofq_jax.config_args import parse_arg
from ofq_jax.models.config import model_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_arg(arg, where="configs/deit_model.py", size=("tiny", "small", "base"),
                   bits=2, attention=("qkr", "standard"),
                   method=("statsq", "lsq"))
  bits = args["bits"]
  quant = dict(enabled=bits > 0)
  if bits > 0:
    quant.update(weight_bits=bits, act_bits=bits, attention=args["attention"],
                 weight_method=args["method"])
  return model_config(args["size"], quant=quant)
