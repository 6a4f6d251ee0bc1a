"""The methods of the OFQ ablation (paper Table 4 style), as config settings.

Each method is the stages it runs and the quantizer choices of ``config.model.quant``:

* ``float``: the full-precision model only.
* ``lsq``: the LSQ baseline, LSQ weights and activations, standard attention.
* ``statsq``: StatsQ weights, LSQ activations, standard attention.
* ``statsq_qkr``: StatsQ + query-key reparameterization.
* ``ofq``: StatsQ + QKR + confidence-guided annealing (the full method).
"""

from __future__ import annotations

import ml_collections

from ofq_jax.errors import UserError

METHODS: dict[str, dict] = {
    "float": dict(stages=("float",), weight_method="statsq", attention="qkr"),
    "lsq": dict(stages=("float", "qat"), weight_method="lsq", attention="standard"),
    "statsq": dict(stages=("float", "qat"), weight_method="statsq", attention="standard"),
    "statsq_qkr": dict(stages=("float", "qat"), weight_method="statsq", attention="qkr"),
    "ofq": dict(stages=("float", "qat", "cga"), weight_method="statsq", attention="qkr"),
}


def apply_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Sets ``config.method``, ``config.stages`` and the quantizer choices for ``method``."""
  if method not in METHODS:
    raise UserError(f"method={method!r} is not one of {tuple(METHODS)}; e.g. "
                     "--config=configs/digits.py:method=lsq,bits=2,seed=1.")
  choice = METHODS[method]
  config.method = method
  config.stages = choice["stages"]
  config.model.quant.weight_method = choice["weight_method"]
  config.model.quant.attention = choice["attention"]
  return config
