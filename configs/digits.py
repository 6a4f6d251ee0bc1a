r"""The embedded default: OFQ on scikit-learn's digits, float -> W2A2 QAT -> CGA.

  python -m ofq_jax.main --config=configs/digits.py --workdir=/tmp/ofq_digits
  python -m ofq_jax.main --config=configs/digits.py:bits=4 --workdir=/tmp/ofq_digits_w4
  python -m ofq_jax.main --config=configs/digits.py:method=lsq,bits=2,seed=1 --workdir=/tmp/d

No download: the data ship with scikit-learn (fixed stratified 80/20 split, seed 0).
Prints a table (float, after QAT, after CGA top-1; frozen fraction; oscillating
fraction) and writes ``summary.json``. Argument string: ``method`` (float | lsq |
statsq | statsq_qkr | ofq, default ofq; see ``ofq_jax.methods``), ``bits`` (2|3|4,
default 2), ``seed``. Any field can be overridden, e.g. ``--config.qat.epochs=10
--config.batch_size=128``; ``python -m ofq_jax.plots --workdir=DIR`` redraws the plots.
"""

from ofq_jax.recipes import digits_recipe


def get_config(arg: str = ""):
  return digits_recipe(arg)
