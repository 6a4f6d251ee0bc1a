"""RandAugment ``rand-m9-mstd0.5-inc1`` (ofq_jax/data/randaugment.py) against timm's PIL
implementation: every op on the same uint8 images, the level -> argument mappings, and the
sampling statistics. The comparison code is bench/randaugment_vs_timm.py (which prints the
same checks as a table on larger images); timm's ``timm/data/auto_augment.py`` is loaded as
a single file (PIL and numpy only), never ``timm`` / ``torchvision`` as packages."""

import pytest
import tensorflow as tf

from ofq_jax.data import randaugment as ra
from support import load_bench



bench = load_bench("randaugment_vs_timm")


@pytest.fixture(scope="module")
def timm_aa():
  return bench.load_timm_auto_augment()


@pytest.fixture(scope="module")
def images():
  # random 24x32 and 17x23, a smooth 20x28 gradient, scikit-learn's china.jpg at 40x60 and
  # a low-contrast copy of it (AutoContrast / Equalize have something to stretch).
  return bench.make_images("test")


def test_all_fifteen_ops_are_compared(timm_aa):
  """Our op list is timm's increasing set (``_RAND_INCREASING_TRANSFORMS``), in timm's
  order (``draw``'s op index means the same op on both sides), and each has a bound."""
  assert list(ra.OPS) == timm_aa._RAND_INCREASING_TRANSFORMS
  assert set(bench.BOUNDS) == set(ra.OPS)


@pytest.mark.parametrize("name", ra.OPS)
def test_op_matches_timm(name, timm_aa, images):
  """``apply_op`` (run as tf.data runs it: traced, dynamic image shape) against timm's
  ``AugmentOp(name, prob=1.0, magnitude=m)`` on PIL images, at magnitudes 0, 3, 6, 7.5, 9
  and 10 and both forced signs, with timm's ImageNet hparams (``img_mean`` fill
  (124, 116, 104), ``translate_pct`` 0.45) and bilinear resampling.

  Bounds (bench.BOUNDS): Invert, Posterize and Solarize are exact LUTs. The colour and
  histogram ops and the geometric ops reproduce PIL's arithmetic step by step (float32
  blends truncated, PIL's integer "L" conversion and SMOOTH filter, float64 LUTs; PIL's
  bilinear affine with pixel centres at +0.5, clamped edge taps, fill outside and
  truncation) and match exactly here; they may differ in at most 0.1 % of the values
  (colour: by at most 1 level; geometric: mean difference <= 0.01), which a Pillow or TF
  build that rounds one step differently (FMA contraction, last-bit cos/sin) can cause,
  whereas rounding instead of truncating, a half-pixel offset or another edge rule changes
  10-50 % of the values.
  """
  row = bench.compare_op(tf, timm_aa, bench.timm_hparams(timm_aa), name, images)
  assert row["cases"] >= len(images)
  assert row["passed"], row


def test_level_mapping_matches_timm(timm_aa):
  """``level_to_arg`` (degrees, bits, threshold, addition, blend factor, shear, translate
  fraction) equals timm's ``LEVEL_TO_ARG`` exactly at every level 0, 0.01, ..., 10 (float32
  levels, as ours are sampled) and both signs: both evaluate the same float64 expressions,
  so any difference is a formula difference, not rounding."""
  assert bench.level_mapping_gap(tf, timm_aa) == 0


def test_sampling_matches_timm(timm_aa):
  """3000 RandAugment calls (6000 layers) of ``randaugment.draw`` and of timm's
  ``rand_augment_transform('rand-m9-mstd0.5-inc1')`` (image work replaced by a recorder):
  op choice uniform over the 15 ops with replacement (chi-square), each layer applied with
  p 0.5 and signed ops negated with p 0.5 (binomial), the magnitude N(9, 0.5) clipped to
  [0, 10] (binomial for the mass 1 - Phi(2) at 10, KS below it), and ours vs timm (chi-square
  contingency of op counts, two-sample KS of magnitudes). The seeds are fixed, so the test is
  deterministic; p > 0.001 is the bar: a correct sampler fails it for 1 in 1000 seed choices,
  while a missing op, p 0.25 vs 0.5 or std 1 vs 0.5 gives p < 1e-10 at this sample size."""
  rows = bench.sampling_stats(bench.our_draws(tf, 3000), bench.timm_draws(timm_aa, 3000))
  assert len(rows) == 12
  for row in rows:
    assert row["p"] > 1e-3, row
