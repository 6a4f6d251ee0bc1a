"""The ImageNet recipes against the reference's table (spec 5.2, 5.3, 6).

The expected values are transcribed from ``../shared/ofq_spec.md`` section 5.2; the
table in ``configs/imagenet.py``'s docstring is parsed and compared with both.
"""

import re

import numpy as np
import pytest

from ofq_jax import optim, recipes
from ofq_jax.config_args import parse_arg
from ofq_jax.models import deit, swin
from ofq_jax.models.config import PRESETS
from support.runs import imagenet_config, load_config_file

IMAGENET_TRAIN = 1_281_167

# (model, bits): (global batch, per-GPU batch, lr, wd, warmup, mixup, cutmix,
#                 label smoothing, repeated aug, paper top-1)
SPEC_5_2 = {
    ("tiny", 2): (560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 64.33),
    ("tiny", 3): (560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 72.72),
    ("tiny", 4): (560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 75.46),
    ("small", 2): (560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 75.72),
    ("small", 3): (800, 100, 3.2e-4, 0.0, 0, 0.8, 1.0, 0.1, 3, 79.57),
    ("small", 4): (800, 100, 3.2e-4, 0.0, 0, 0.8, 1.0, 0.1, 3, 81.10),
    # Swin-T, SWIN.md 8.5 (train_scripts/swin_t/*.sh): 8 x 64, no repeated augmentation.
    ("swin_t", 2): (512, 64, 5e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 78.52),
    ("swin_t", 3): (512, 64, 2e-4, 0.0, 0, 0.8, 1.0, 0.1, 0, 81.09),
    ("swin_t", 4): (512, 64, 2e-4, 0.0, 0, 0.8, 1.0, 0.1, 0, 81.88),
}


@pytest.mark.parametrize("model,bits", sorted(SPEC_5_2))
def test_recipe_matches_spec_table(model, bits):
  (batch, per_gpu, lr, wd, warmup, mixup, cutmix, smoothing, repeats, top1) = \
      SPEC_5_2[model, bits]
  config = imagenet_config(model, bits)
  assert config.stages == ("qat",)
  assert config.model.embed_dim == {"tiny": 192, "small": 384, "swin_t": 96}[model]
  assert config.model.num_classes == 1000
  if model == "swin_t":  # torchvision's swin_t, drop path 0, CGA on fc1/fc2/v/proj/reductions
    assert (config.model.arch, config.model.depths, config.model.drop_path) == (
        "swin", (2, 2, 6, 2), 0.0)
    assert config.model.quant.position_table_init == "random"
    assert config.cga.targets == swin.FAMILY.cga_targets
  else:
    assert config.model.distilled and config.cga.targets == deit.FAMILY.cga_targets
  quant = config.model.quant
  assert (quant.weight_bits, quant.act_bits, quant.weight_method, quant.attention) == (
      bits, bits, "statsq", "qkr")
  assert quant.lsq_grad_batch == per_gpu
  assert (quant.attn_proj_init, quant.qk_bias) == ("random", "drop")  # reference quirks
  assert config.batch_size == batch
  qat = config.qat
  assert (qat.lr, qat.weight_decay, qat.warmup_epochs) == (lr, wd, warmup)
  assert (qat.epochs, qat.cooldown_epochs, qat.min_lr, qat.warmup_lr) == (300, 10, 1e-5, 1e-6)
  assert qat.teacher == recipes.TEACHER_FILES[model]
  assert (config.data.mixup, config.data.cutmix, config.data.repeated_aug) == (
      mixup, cutmix, repeats)
  assert config.data.label_smoothing == smoothing and config.label_smoothing == 0.0
  assert config.data.randaugment == "rand-m9-mstd0.5-inc1"
  assert (config.data.random_erasing, config.data.eval_resize) == (0.25, 248)
  assert config.kd.teacher_logits == "cls"
  assert (config.cga.epochs, config.cga.boundary_range) == (30, 0.005)
  assert recipes.IMAGENET[model, bits].top1 == top1
  assert imagenet_config(model, bits, "cga").stages == ("cga",)


def _docstring_rows() -> dict[tuple[str, int], tuple]:
  """The table of configs/imagenet.py's docstring, one tuple per row."""
  rows = {}
  for line in load_config_file("imagenet").__doc__.splitlines():
    m = re.fullmatch(r"\s+(tiny|small|swin_t)\s+(\d)\s+([\d.]+)\s+(\d) x (\d+)\s+([\de.-]+)\s+([\d.]+)"
                     r"\s+(\d)\s+(off|([\d.]+) / ([\d.]+) \(([\d.]+)\))\s+(-|x(\d))", line)
    if m:
      g = m.groups()
      mixing = (0.0, 0.0, 0.0) if g[8] == "off" else tuple(float(v) for v in g[9:12])
      rows[g[0], int(g[1])] = (float(g[2]), int(g[3]), int(g[4]), float(g[5]), float(g[6]),
                               int(g[7]), *mixing, int(g[13] or 0))
  return rows


def test_docstring_table_is_the_recipe_table():
  """What the docstring shows is recipes.IMAGENET, and both follow spec 5.2."""
  rows = _docstring_rows()
  assert set(rows) == set(recipes.IMAGENET) == set(SPEC_5_2)
  for key, row in recipes.IMAGENET.items():
    assert rows[key] == tuple(row), key
    batch, per_gpu, lr, wd, warmup, mixup, cutmix, ls, rep, top1 = SPEC_5_2[key]
    assert (row.gpus * row.per_gpu, row.per_gpu, row.lr, row.wd, row.warmup, row.mixup,
            row.cutmix, row.ls, row.rep, row.top1) == (batch, per_gpu, lr, wd, warmup, mixup,
                                                       cutmix, ls, rep, top1)


def test_docstring_has_both_stage_commands():
  doc = load_config_file("imagenet").__doc__
  assert "--config=configs/imagenet.py:model=tiny,bits=2 --workdir" in doc
  assert "--config=configs/imagenet.py:model=tiny,bits=2,stage=cga --workdir" in doc
  assert recipes.TEACHER_FILES["tiny"] in doc and recipes.TEACHER_FILES["small"] in doc


@pytest.mark.parametrize("model,bits", sorted(SPEC_5_2))
def test_recipe_schedule_resolves(model, bits):
  """Iterations per epoch as the reference (spec 5.2) and the LR curve's landmarks."""
  config = imagenet_config(model, bits)
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size
  assert steps_per_epoch == {560: 2287, 800: 1601, 512: 2502}[config.batch_size]
  schedule = optim.epoch_schedule(steps_per_epoch, base_lr=config.qat.lr,
                                  epochs=config.qat.epochs,
                                  warmup_epochs=config.qat.warmup_epochs,
                                  warmup_lr=config.qat.warmup_lr, min_lr=config.qat.min_lr)
  first = float(schedule(0))
  assert first == pytest.approx(1e-6 if config.qat.warmup_epochs else config.qat.lr)
  assert float(schedule(309 * steps_per_epoch)) == pytest.approx(1e-5)


@pytest.mark.parametrize("arg,message", [
    ("stage=float", "configs/imagenet.py: stage='float' is not one of qat, cga "
                    "(known: model, bits, stage)"),
    ("bits=five", "configs/imagenet.py: bits='five' is not an int (known: model, bits, stage)"),
    ("bits=5", "configs/imagenet.py: bits='5' is not one of 2, 3, 4"),
    ("model=huge", "configs/imagenet.py: model='huge' is not one of tiny, small, base, "
                   "swin_t, swin_s, swin_b"),
    ("size=tiny", "configs/imagenet.py: unknown argument 'size' (known: model, bits, stage)"),
    ("tiny", "configs/imagenet.py: argument 'tiny' is not key=value"),
])
def test_bad_arguments_fail_in_one_line(arg, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    load_config_file("imagenet").get_config(arg)


def test_digits_arguments_are_typed():
  config = load_config_file("digits").get_config("method=lsq,bits=3,seed=7")
  assert (config.method, config.model.quant.weight_bits, config.seed) == ("lsq", 3, 7)
  assert load_config_file("digits").get_config("").method == "ofq"
  with pytest.raises(ValueError, match=r"^configs/digits.py: bits='9' is not one of 2, 3, 4"):
    load_config_file("digits").get_config("bits=9")


def test_parse_arg_defaults_and_types():
  assert parse_arg("", where="x", a=("p", "q"), n=3, f=0.5) == dict(a="p", n=3, f=0.5)
  assert parse_arg(" n=4 , f=1e-3", where="x", a=("p", "q"), n=3, f=0.5) == dict(
      a="p", n=4, f=1e-3)


@pytest.mark.parametrize("model,bits", sorted(recipes.BEYOND_PAPER))
def test_beyond_paper_rows_run_the_row_they_borrow(model, bits):
  """DeiT-B / Swin-S / Swin-B: the borrowed paper row's config but for the architecture
  (the family's preset) and the teacher file; no paper number of their own."""
  mine = recipes.imagenet(model, bits).to_dict()
  theirs = recipes.imagenet(*recipes.BEYOND_PAPER[model, bits]).to_dict()
  family, preset = recipes.MODELS[model]
  presets = swin.PRESETS if family == "swin" else PRESETS
  for key, value in presets[preset].items():
    assert tuple(np.atleast_1d(mine["model"][key])) == tuple(np.atleast_1d(value)), key
  assert mine["qat"].pop("teacher") == recipes.TEACHER_FILES[model]
  theirs["qat"].pop("teacher")
  mine_model, theirs_model = mine.pop("model"), theirs.pop("model")
  assert mine == theirs and mine_model["quant"] == theirs_model["quant"]
  assert (model, bits) not in recipes.IMAGENET
