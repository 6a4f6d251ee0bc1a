"""Training recipes as data: the paper's ImageNet table (spec 5.2 / 5.3 / 6) and digits.

``IMAGENET`` holds the rows of the reference's table; ``imagenet(model, bits, stage)``
is ``base()`` plus one row, ``digits(method, bits, seed)`` is ``base()`` plus the
embedded default's sizes. ``configs/imagenet.py`` and ``configs/digits.py`` parse their
typed argument strings into these calls. Reference quirks stay at their reference
values; each comment names the flag that changes it.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from ofq_jax.config_args import parse_arg
from ofq_jax.errors import UserError
from ofq_jax.methods import METHODS, apply_method
from ofq_jax.models import FAMILIES, deit, swin
from ofq_jax.models.tracker import tracking_config


class Row(NamedTuple):
  """One ImageNet run of the reference (spec 5.2) and its paper top-1 after CGA (spec 6)."""
  top1: float
  gpus: int
  per_gpu: int  # per-GPU batch; also the LSQ gradient-scale batch (spec 7.6)
  lr: float
  wd: float
  warmup: int  # epochs
  mixup: float
  cutmix: float
  ls: float  # label smoothing of the mixup / cutmix targets
  rep: int  # repeated augmentation (0: off)


# DeiT-S W3A3 / W4A4 use the deit_default_imagent config; DeiT-S W4A4's script is broken
# as released (spec 7.14), so its row assumes the W3A3 flags with 4 bits.
IMAGENET: dict[tuple[str, int], Row] = {
    #              top1   gpus per_gpu lr       wd    warm mixup cutmix ls   rep
    ("tiny", 2):  Row(64.33, 4, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0),
    ("tiny", 3):  Row(72.72, 4, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0),
    ("tiny", 4):  Row(75.46, 4, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0),
    ("small", 2): Row(75.72, 4, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0),
    ("small", 3): Row(79.57, 8, 100, 3.2e-4, 0.0, 0, 0.8, 1.0, 0.1, 3),
    ("small", 4): Row(81.10, 8, 100, 3.2e-4, 0.0, 0, 0.8, 1.0, 0.1, 3),
    # Swin-T (SWIN.md 8.5, train_scripts/swin_t/*.sh): 8 x 64, no repeated augmentation.
    ("swin_t", 2): Row(78.52, 8, 64, 5e-4, 0.05, 5, 0.0, 0.0, 0.0, 0),
    ("swin_t", 3): Row(81.09, 8, 64, 2e-4, 0.0, 0, 0.8, 1.0, 0.1, 0),
    ("swin_t", 4): Row(81.88, 8, 64, 2e-4, 0.0, 0, 0.8, 1.0, 0.1, 0),
}

BEYOND_PAPER: dict[tuple[str, int], tuple[str, int]] = {
    **{("base", bits): ("small", bits) for bits in (2, 3, 4)},
    **{(model, bits): ("swin_t", bits) for model in ("swin_s", "swin_b") for bits in (2, 3, 4)},
}
"""Not paper rows: DeiT-B and torchvision's Swin-S / Swin-B, which users train next. Each
runs the recipe of the paper row it names (DeiT-S's, Swin-T's), untuned for the larger
model, and has no paper number."""

MODELS = {"tiny": ("deit", "tiny"), "small": ("deit", "small"), "base": ("deit", "base"),
          "swin_t": ("swin", "tiny"), "swin_s": ("swin", "small"), "swin_b": ("swin", "base")}
"""``configs/imagenet.py``'s model names: (family, preset)."""

TEACHER_FILES = {"tiny": "deit_tiny_distilled_patch16_224-b40b3cf7.pth",
                 "small": "deit_small_distilled_patch16_224-649709d9.pth",
                 "base": "deit_base_distilled_patch16_224-df68dfff.pth",
                 # torchvision's IMAGENET1K_V1 files
                 "swin_t": "swin_t-704ceda3.pth", "swin_s": "swin_s-5e29d889.pth",
                 "swin_b": "swin_b-68c6b09e.pth"}

# Kept for callers of the earlier names.
PAPER_TOP1 = {key: row.top1 for key, row in IMAGENET.items()}


def _dict(**values) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(values)


def base() -> ml_collections.ConfigDict:
  """The keys every recipe has, at the values the recipes share."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = ("qat",)
  config.num_train_steps = -1  # > 0 replaces every stage's epochs (smoke tests)
  config.label_smoothing = 0.0
  config.mesh = _dict(data=-1, fsdp=1)
  config.optim = _dict(b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0)
  # Soft targets are the teacher's cls-head logits (spec 5.1, item 7.4); 'avg' uses both.
  # teacher_precision: the KD teacher's matmul precision ('highest' = float32, as the
  # reference; 'high' = bf16x3, 'default' = the platform's fastest, e.g. bf16 / TF32).
  config.kd = _dict(teacher_logits="cls", teacher_precision="highest")
  config.float = _dict(epochs=0, cooldown_epochs=0, lr=0.0, warmup_epochs=0, warmup_lr=0.0,
                       min_lr=0.0, weight_decay=0.0, init_from="")
  config.qat = _dict(epochs=0, cooldown_epochs=0, lr=0.0, warmup_epochs=0, warmup_lr=1e-6,
                     min_lr=1e-5, weight_decay=0.0, teacher="")
  # include_qk: also anneal QKR's W_q^T W_k, which the reference never freezes (spec 4.4):
  # the CGA stage then holds W_qk as one parameter, started at the QAT product.
  config.cga = _dict(epochs=0, boundary_range=0.005, targets=deit.FAMILY.cga_targets, resume="",
                     include_qk=False)
  config.async_checkpointing = True
  # Multi-process runs: every this many steps the processes agree whether any of them
  # got SIGTERM (one all-gather); all then save the same step and exit 143.
  config.stop_check_every_steps = 10
  config.tensorboard = True
  config.plots = True  # PNGs in workdir/plots at the end (python -m ofq_jax.plots redraws)
  return config


def imagenet(model: str, bits: int, stage: str = "qat") -> ml_collections.ConfigDict:
  """One row of the paper's table: QAT (300 + 10 epochs) or its CGA stage (30 epochs);
  ``model``: DeiT ``tiny`` / ``small`` or ``swin_t`` (or one of ``BEYOND_PAPER``'s:
  ``base``, ``swin_s``, ``swin_b``)."""
  if (model, bits) not in IMAGENET and (model, bits) not in BEYOND_PAPER:
    raise UserError(f"No ImageNet recipe for model={model!r}, bits={bits!r}; rows: "
                     f"{sorted(IMAGENET)}, beyond the paper: {sorted(BEYOND_PAPER)}.")
  if stage not in ("qat", "cga"):
    raise UserError(f"stage={stage!r}; the recipes run 'qat' then 'cga'.")
  row = IMAGENET[BEYOND_PAPER.get((model, bits), (model, bits))]
  family, preset = MODELS[model]
  config = base()
  config.seed = 42  # the reference seeds 42 + rank
  config.stages = (stage,)
  quant = dict(weight_bits=bits, act_bits=bits, weight_method="statsq", attention="qkr",
               # The reference's LSQ gradient scale uses its per-GPU batch (spec 7.6).
               lsq_grad_batch=row.per_gpu,
               # Reference bug 7.1: attn.proj starts random; 'pretrained' loads it.
               attn_proj_init="random",
               # Reference 7.3: QKR drops b_q, b_k; 'fold' keeps the attention exact.
               qk_bias="drop")
  if family == "swin":
    # Reference quirk (SWIN.md 5): position tables re-drawn; 'pretrained' copies them.
    # Drop path 0 (the recipe's; torchvision trains swin_t with 0.2).
    config.model = swin.model_config(preset, num_classes=1000, drop_path=0.0,
                                     quant=dict(quant, position_table_init="random"))
  else:
    config.model = deit.model_config(preset, num_classes=1000, distilled=True, quant=quant)
  config.cga.targets = FAMILIES[family].cga_targets
  config.data = _dict(
      name="imagenet2012", data_dir=ml_collections.config_dict.placeholder(str),
      manual_dir=ml_collections.config_dict.placeholder(str),
      image_size=224, eval_resize=248, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
      interpolation="random", hflip=0.5, randaugment="rand-m9-mstd0.5-inc1",
      random_erasing=0.25, random_erasing_mode="pixel", mixup=row.mixup, cutmix=row.cutmix,
      mixup_switch_prob=0.5, mixup_prob=1.0,
      label_smoothing=row.ls,  # of the mixup / cutmix targets; hard labels are not smoothed
      repeated_aug=row.rep, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  config.batch_size = row.gpus * row.per_gpu  # global
  config.eval_batch_size = 800
  config.fsdp_min_size = 2 ** 16
  config.qat.update(epochs=300, cooldown_epochs=10, lr=row.lr, warmup_epochs=row.warmup,
                    weight_decay=row.wd, teacher=TEACHER_FILES[model])
  config.cga.epochs = 30
  config.log_every_steps = 100
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.tracking = tracking_config()
  return config


def digits(method: str = "ofq", bits: int = 2, seed: int = 0, arch: str = "deit"
           ) -> ml_collections.ConfigDict:
  """The embedded default: float -> b-bit QAT -> CGA on scikit-learn's digits.

  ``arch='swin'``: a tiny Swin sized for the 16 px images (patch 2, window 4: an 8 x 8
  map of four windows, then a 4 x 4 map in one window), with the QKR Swin's CGA targets.
  """
  config = base()
  config.seed = seed
  config.stages = ("float", "qat", "cga")
  quant = dict(weight_bits=bits, act_bits=bits, attention="qkr", weight_method="statsq")
  if arch == "swin":
    config.model = swin.model_config(
        None, embed_dim=48, depths=(2, 2), num_heads=(2, 4), window_size=4, patch_size=2,
        img_size=16, mlp_ratio=4.0, num_classes=10, quant=quant)
    config.cga.targets = swin.FAMILY.cga_targets
  else:
    config.model = deit.model_config(
        None, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, patch_size=4, img_size=16,
        num_classes=10, distilled=True, quant=quant)
  config.data = _dict(name="digits", image_size=16, augment="shift")
  config.batch_size = 64
  config.eval_batch_size = 120
  config.fsdp_min_size = 2 ** 12
  config.float.update(epochs=60, lr=1e-3, warmup_epochs=3, warmup_lr=1e-6, min_lr=1e-5,
                      weight_decay=0.05)
  config.qat.update(epochs=40, cooldown_epochs=2, lr=5e-4, warmup_epochs=2, weight_decay=0.05)
  config.cga.epochs = 5
  config.log_every_steps = 20
  config.eval_every_steps = 110  # 5 epochs at batch 64 (0: at the end of each stage only)
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.tracking = tracking_config(scales_every_steps=10)
  return apply_method(config, method)


def imagenet_recipe(size: str, bits: int, arg: str = "") -> ml_collections.ConfigDict:
  """``imagenet(size, bits, stage)`` with ``stage`` from an argument string (earlier API)."""
  args = parse_arg(arg, where="imagenet_recipe", stage=("qat", "cga"))
  return imagenet(size, bits, args["stage"])


def digits_recipe(arg: str = "") -> ml_collections.ConfigDict:
  """``configs/digits.py``'s config from its argument string ``method=,bits=,seed=``."""
  return digits(**parse_arg(arg, where="configs/digits.py", method=tuple(
      ["ofq"] + [m for m in METHODS if m != "ofq"]), bits=(2, 3, 4), seed=0,
      arch=("deit", "swin")))
