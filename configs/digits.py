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

import ml_collections

from ofq_jax.config_args import parse_config_arg
from ofq_jax.cga import DEFAULT_TARGETS
from ofq_jax.methods import apply_method
from ofq_jax.models.deit import model_config
from ofq_jax.models.tracker import tracking_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_config_arg(arg, ("method", "bits", "seed"))
  bits = int(args.get("bits", "2"))
  config = ml_collections.ConfigDict()
  config.seed = int(args.get("seed", "0"))
  config.stages = ("float", "qat", "cga")

  config.model = model_config(
      None, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, patch_size=4, img_size=16,
      num_classes=10, distilled=True,
      quant=dict(weight_bits=bits, act_bits=bits, attention="qkr", weight_method="statsq"))
  config.data = ml_collections.ConfigDict(dict(name="digits", image_size=16, augment="shift"))

  config.batch_size = 64
  config.eval_batch_size = 120
  config.num_train_steps = -1  # > 0 replaces every stage's epochs (smoke tests)
  config.label_smoothing = 0.0
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  config.fsdp_min_size = 2 ** 12
  config.optim = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0))
  config.kd = ml_collections.ConfigDict(dict(teacher_logits="cls"))  # 'cls' (reference) | 'avg'

  config.float = ml_collections.ConfigDict(dict(
      epochs=60, cooldown_epochs=0, lr=1e-3, warmup_epochs=3, warmup_lr=1e-6, min_lr=1e-5,
      weight_decay=0.05, init_from=""))
  config.qat = ml_collections.ConfigDict(dict(
      epochs=40, cooldown_epochs=2, lr=5e-4, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5,
      weight_decay=0.05, teacher=""))
  config.cga = ml_collections.ConfigDict(dict(
      epochs=5, boundary_range=0.005, targets=DEFAULT_TARGETS, resume=""))

  config.log_every_steps = 20
  config.eval_every_steps = 110  # 5 epochs at batch 64 (0: at the end of each stage only)
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.async_checkpointing = True
  config.tensorboard = True
  config.plots = True  # PNGs in workdir/plots at the end (python -m ofq_jax.plots redraws)
  config.tracking = tracking_config(scales_every_steps=10)
  return apply_method(config, args.get("method", "ofq"))
