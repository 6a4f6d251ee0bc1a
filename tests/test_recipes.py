"""The ImageNet recipe configs against the reference's table (spec 5.2, 5.3, 6).

The expected values are transcribed from ``../shared/ofq_spec.md`` section 5.2.
"""

import importlib.util
import pathlib

import pytest

from ofq_jax import optim

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
IMAGENET_TRAIN = 1_281_167

# name: (size, bits, global batch, per-GPU batch, lr, wd, warmup, mixup, cutmix,
#        label smoothing, repeated aug, paper top-1)
SPEC_5_2 = {
    "deit_t_w2a2": ("tiny", 2, 560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 64.33),
    "deit_t_w3a3": ("tiny", 3, 560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 72.72),
    "deit_t_w4a4": ("tiny", 4, 560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 75.46),
    "deit_s_w2a2": ("small", 2, 560, 140, 5.47e-4, 0.05, 5, 0.0, 0.0, 0.0, 0, 75.72),
    "deit_s_w3a3": ("small", 3, 800, 100, 3.2e-4, 0.0, 0, 0.8, 1.0, 0.1, 3, 79.57),
    "deit_s_w4a4": ("small", 4, 800, 100, 3.2e-4, 0.0, 0, 0.8, 1.0, 0.1, 3, 81.10),
}


def load(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(SPEC_5_2))
def test_recipe_matches_spec_table(name):
  (size, bits, batch, per_gpu, lr, wd, warmup, mixup, cutmix, smoothing, repeats,
   top1) = SPEC_5_2[name]
  module = load(name)
  config = module.get_config()
  assert config.stages == ("qat",)
  assert config.model.embed_dim == {"tiny": 192, "small": 384}[size]
  assert config.model.distilled and config.model.num_classes == 1000
  quant = config.model.quant
  assert (quant.weight_bits, quant.act_bits, quant.weight_method, quant.attention) == (
      bits, bits, "statsq", "qkr")
  assert quant.lsq_grad_batch == per_gpu
  assert (quant.attn_proj_init, quant.qk_bias) == ("random", "drop")  # reference quirks
  assert config.batch_size == batch
  qat = config.qat
  assert (qat.lr, qat.weight_decay, qat.warmup_epochs) == (lr, wd, warmup)
  assert (qat.epochs, qat.cooldown_epochs, qat.min_lr, qat.warmup_lr) == (300, 10, 1e-5, 1e-6)
  assert (config.data.mixup, config.data.cutmix, config.data.repeated_aug) == (
      mixup, cutmix, repeats)
  assert config.data.label_smoothing == smoothing and config.label_smoothing == 0.0
  assert config.data.randaugment == "rand-m9-mstd0.5-inc1"
  assert (config.data.random_erasing, config.data.eval_resize) == (0.25, 248)
  assert config.kd.teacher_logits == "cls"
  assert (config.cga.epochs, config.cga.boundary_range) == (30, 0.005)
  cga = module.get_config("stage=cga")
  assert cga.stages == ("cga",)
  # Docstring: both commands and the paper's number.
  doc = module.__doc__
  assert f"--config=configs/{name}.py --workdir" in doc
  assert f"--config=configs/{name}.py:stage=cga --workdir" in doc
  assert f"{top1:.2f}" in doc


@pytest.mark.parametrize("name", sorted(SPEC_5_2))
def test_recipe_schedule_resolves(name):
  """Iterations per epoch as the reference (spec 5.2) and the LR curve's landmarks."""
  config = load(name).get_config()
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size
  assert steps_per_epoch == (2287 if config.batch_size == 560 else 1601)
  schedule = optim.epoch_schedule(steps_per_epoch, base_lr=config.qat.lr,
                                  epochs=config.qat.epochs,
                                  warmup_epochs=config.qat.warmup_epochs,
                                  warmup_lr=config.qat.warmup_lr, min_lr=config.qat.min_lr)
  first = float(schedule(0))
  assert first == pytest.approx(1e-6 if config.qat.warmup_epochs else config.qat.lr)
  assert float(schedule(309 * steps_per_epoch)) == pytest.approx(1e-5)


def test_bad_stage_argument():
  with pytest.raises(ValueError, match="stage='float'"):
    load("deit_t_w2a2").get_config("stage=float")
