"""RandAugment (``ofq_jax/data/randaugment.py``) against timm's PIL implementation.

  python bench/randaugment_vs_timm.py            # per-op table and sampling statistics
  python bench/randaugment_vs_timm.py --json     # the same as JSON

Each of the 15 ops of ``rand-m9-mstd0.5-inc1`` runs on the same uint8 images on both sides:
timm's ``AugmentOp(name, prob=1.0, magnitude=m)`` (magnitude_std 0) with the hparams timm's
``create_transform`` gives RandAugment at 224 px (``translate_const`` 100, ``img_mean`` fill
(124, 116, 104)) and the interpolation fixed to bilinear, and ours
(``randaugment.apply_op``), at fixed magnitudes and both signs where the op has a random
sign (forced on both sides). The sampling part draws many RandAugment parameter sets from
both and compares which ops are picked, how often they apply, the magnitude noise and the
signs. timm's ``timm/data/auto_augment.py`` is loaded as a single file (it imports only PIL
and numpy), never ``timm`` or ``torchvision`` as packages.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

SPEC = "rand-m9-mstd0.5-inc1"
MAGNITUDES = (0.0, 3.0, 6.0, 7.5, 9.0, 10.0)
NO_MAGNITUDE = ("AutoContrast", "Equalize", "Invert")
SIGNED = ("Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
EXACT = ("Invert", "PosterizeIncreasing", "SolarizeIncreasing")

# Per op: (max abs diff, fraction of values differing, mean abs diff) allowed (None: not
# bounded), and the note. Ours reproduces PIL's arithmetic step by step, so on this machine
# every op matches exactly; the non-zero bounds leave room for a Pillow or TF build that
# rounds one step differently (a compiler contracting a * b + c into an FMA, a libm whose
# cos/sin differ in the last bit), which flips single values by one level where the exact
# result sits on an integer. Rounding instead of truncating, a half-pixel shift or a
# different edge rule change 10-50 % of the values (the state before this comparison), so
# the fraction bound is what catches a real difference.
_LUT = (0, 0.0, None)
_ARITH = (1, 1e-3, None)
_GEOM = (None, 1e-3, 0.01)
BOUNDS = {
    "AutoContrast": _ARITH + ("float64 LUT int(v * scale + offset), as ImageOps.autocontrast",),
    "Equalize": _ARITH + ("integer LUT, as ImageOps.equalize",),
    "Invert": _LUT + ("exact by construction",),
    "PosterizeIncreasing": _LUT + ("exact by construction; at m=10 (0 bits) Pillow 13 raises, "
                                   "compared with Pillow 9's black image",),
    "SolarizeIncreasing": _LUT + ("exact by construction",),
    "SolarizeAdd": _ARITH + ("integer LUT",),
    "ColorIncreasing": _ARITH + ("PIL 'L' in integers, float32 blend truncated",),
    "ContrastIncreasing": _ARITH + ("mean of PIL 'L' in float64, float32 blend truncated",),
    "BrightnessIncreasing": _ARITH + ("float32 blend with black, truncated",),
    "SharpnessIncreasing": _ARITH + ("SMOOTH rounded in integers, border copied, blend "
                                     "truncated",),
    "Rotate": _GEOM + ("PIL's matrix (angle mod 360, round(cos, 15)) and bilinear",),
    "ShearX": _GEOM + ("PIL's bilinear: pixel centres at +0.5, edge taps clamped, fill "
                       "outside, truncated",),
    "ShearY": _GEOM + ("as ShearX",),
    "TranslateXRel": _GEOM + ("as ShearX; shift pct * width",),
    "TranslateYRel": _GEOM + ("as ShearX; shift pct * height",),
}


def load_timm_auto_augment():
  """``timm/data/auto_augment.py`` as a module of its own (PIL and numpy only)."""
  spec = importlib.util.find_spec("timm")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("timm is not installed (pip install -e '.[test]')")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "auto_augment.py"
  module_spec = importlib.util.spec_from_file_location("timm_auto_augment_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def timm_hparams(aa, image_size: int = 224) -> dict:
  """What timm's ``transforms_imagenet_train`` passes to ``rand_augment_transform`` for
  ImageNet mean/std, with the interpolation fixed to bilinear."""
  from PIL import Image
  mean = (0.485, 0.456, 0.406)
  return dict(translate_const=int(image_size * 0.45),
              img_mean=tuple(min(255, round(255 * x)) for x in mean),
              interpolation=Image.Resampling.BILINEAR)


@contextlib.contextmanager
def forced_sign(aa, sign: float):
  """timm draws the sign in ``_randomly_negate``; pin it."""
  original = aa._randomly_negate
  aa._randomly_negate = (lambda v: -v) if sign < 0 else (lambda v: v)
  try:
    yield
  finally:
    aa._randomly_negate = original


def timm_op(aa, hparams, name, image, magnitude, sign=1.0):
  from PIL import Image
  op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
  assert op.magnitude_std == 0
  if name == "PosterizeIncreasing" and op.level_fn(magnitude, hparams)[0] == 0:
    # Magnitude 10 keeps 0 bits. Pillow >= 12 raises for bits=0; the Pillow of OFQ's
    # environment (9.0.1) maps every value through ``i & ~(2**8 - 1)``: a black image.
    return np.zeros_like(image)
  with forced_sign(aa, sign):
    return np.asarray(op(Image.fromarray(image)))


_GRAPHS = {}


def our_op(tf, name, image, magnitude, sign=1.0):
  """``randaugment.apply_op`` traced once per op for any image size, as tf.data runs it."""
  from ofq_jax.data import randaugment as ra
  if name not in _GRAPHS:
    _GRAPHS[name] = tf.function(
        lambda image, level, sign: ra.apply_op(tf, name, image, level, sign), autograph=False,
        input_signature=[tf.TensorSpec([None, None, 3], tf.float32),
                         tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32)])
  out = _GRAPHS[name](tf.constant(image, tf.float32), tf.constant(magnitude, tf.float32),
                      tf.constant(sign, tf.float32))
  return out.numpy().astype(np.uint8)


def make_images(scale: str = "bench") -> dict[str, np.ndarray]:
  """uint8 RGB images: random noise, smooth gradients, a natural photo (scikit-learn's
  china.jpg, downscaled) and a low-contrast copy of it; non-square sizes included."""
  from PIL import Image
  from sklearn.datasets import load_sample_image
  small = scale == "test"
  rng = np.random.default_rng(0)
  images = {}
  h, w = (24, 32) if small else (224, 224)
  images[f"random {h}x{w}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  h, w = (17, 23) if small else (61, 47)
  images[f"random {h}x{w}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  h, w = (20, 28) if small else (96, 128)
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  images[f"gradient {h}x{w}"] = np.stack(
      [255 * x / (w - 1), 255 * y / (h - 1), 127.5 + 100 * np.sin((x + y) / 7.0)],
      -1).round().astype(np.uint8)
  h, w = (40, 60) if small else (160, 240)
  china = np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize(
      (w, h), Image.Resampling.BILINEAR))
  images[f"china {h}x{w}"] = china
  images[f"china low-contrast {h}x{w}"] = (60 + china.astype(np.int32) // 2).astype(np.uint8)
  return images


def cases(name: str, magnitudes=MAGNITUDES):
  mags = (10.0,) if name in NO_MAGNITUDE else magnitudes
  signs = (1.0, -1.0) if name in SIGNED else (1.0,)
  return [(m, s) for m in mags for s in signs]


def compare_op(tf, aa, hparams, name, images, magnitudes=MAGNITUDES) -> dict:
  """Ours vs timm's PIL for one op over images x magnitudes x signs."""
  max_abs, abs_sum, differing, values, worst, count = 0, 0, 0, 0, None, 0
  for image_name, image in images.items():
    for magnitude, sign in cases(name, magnitudes):
      count += 1
      ref = timm_op(aa, hparams, name, image, magnitude, sign).astype(np.int32)
      ours = our_op(tf, name, image, magnitude, sign).astype(np.int32)
      diff = np.abs(ours - ref)
      if diff.max() > max_abs:
        worst = f"{image_name} m={magnitude:g} sign={sign:+g}"
      max_abs = max(max_abs, int(diff.max()))
      abs_sum += int(diff.sum())
      differing += int((diff > 0).sum())
      values += diff.size
  bound_max, bound_frac, bound_mean, why = BOUNDS[name]
  mean_abs, frac = abs_sum / values, differing / values
  ok = ((bound_max is None or max_abs <= bound_max) and frac <= bound_frac
        and (bound_mean is None or mean_abs <= bound_mean))
  return dict(op=name, magnitudes="-" if name in NO_MAGNITUDE else
              ",".join(f"{m:g}" for m in magnitudes) + (" x+-" if name in SIGNED else ""),
              max_abs=max_abs, mean_abs=mean_abs, frac_differing=frac, bound=bound_text(name),
              passed=bool(ok), note=why, worst=worst, cases=count)


def bound_text(name: str) -> str:
  bound_max, bound_frac, bound_mean, _ = BOUNDS[name]
  if bound_max == 0:
    return "exact"
  parts = [] if bound_max is None else [f"max<={bound_max}"]
  if bound_mean is not None:
    parts.append(f"mean<={bound_mean:g}")
  parts.append(f"differing<={100 * bound_frac:g} %")
  return ", ".join(parts)


def bicubic_gap(tf, aa, hparams, name, images, magnitude=9.0) -> float:
  """Mean |ours - timm bicubic| at magnitude 9 on the natural image: the deviation that
  remains (timm's ImageNet recipes with ``train_interpolation='random'`` draw bilinear or
  bicubic per op; ours is always bilinear)."""
  from PIL import Image
  cubic = dict(hparams, interpolation=Image.Resampling.BICUBIC)
  total, count = 0.0, 0
  for image in (image for key, image in images.items() if key.startswith("china ")):
    ref = timm_op(aa, cubic, name, image, magnitude).astype(np.int32)
    total += np.abs(our_op(tf, name, image, magnitude).astype(np.int32) - ref).sum()
    count += ref.size
  return total / count


# ---------------------------------------------------------------------------------------
# Sampling statistics


def timm_draws(aa, count: int, seed: int = 0) -> dict[str, np.ndarray]:
  """``count`` calls of timm's ``rand_augment_transform(SPEC)`` with the ops' image work
  replaced by a recorder: per layer the op index, whether it applied, its magnitude and
  (signed ops) its sign."""
  import random
  saved = random.getstate(), np.random.get_state()
  random.seed(seed)
  np.random.seed(seed)
  transform = aa.rand_augment_transform(SPEC, timm_hparams(aa))
  names = [op.name for op in transform.ops]
  record = []

  class Recorder:
    def __init__(self, op, index):
      self.op, self.index = op, index
      level_fn = op.level_fn
      op.aug_fn = lambda img, *args, **kwargs: img

      def level(magnitude, hparams):
        record[-1]["magnitude"] = magnitude
        return level_fn(magnitude, hparams) if level_fn is not None else ()
      op.level_fn = level

    def __call__(self, img):
      record.append(dict(index=self.index, magnitude=np.nan))
      return self.op(img)

  transform.ops = [Recorder(op, i) for i, op in enumerate(transform.ops)]
  negate = aa._randomly_negate
  signs = []

  def recording_negate(v):
    out = negate(v)
    signs.append(-1.0 if out != v else 1.0)  # v == 0 only at magnitude 0: never drawn
    return out
  aa._randomly_negate = recording_negate
  try:
    for _ in range(count):
      transform(None)
  finally:
    aa._randomly_negate = negate
    random.setstate(saved[0])
    np.random.set_state(saved[1])
  index = np.array([r["index"] for r in record])
  magnitude = np.array([r["magnitude"] for r in record])
  return dict(names=names, index=index, applied=~np.isnan(magnitude),
              magnitude=magnitude[~np.isnan(magnitude)], sign=np.array(signs))


def our_draws(tf, count: int, seed: int = 0) -> dict[str, np.ndarray]:
  """``randaugment.draw`` for seeds (seed, 0..count-1): the same four fields."""
  from ofq_jax.data import randaugment as ra
  seeds = tf.stack([tf.fill([count], tf.constant(seed, tf.int64)),
                    tf.range(count, dtype=tf.int64)], 1)

  @tf.function
  def run(seeds):
    return tf.map_fn(lambda s: ra.draw(tf, s, SPEC), seeds,
                     fn_output_signature=dict(index=tf.int32, apply=tf.bool,
                                              level=tf.float32, sign=tf.float32))
  out = {k: v.numpy().reshape(-1) for k, v in run(seeds).items()}
  index, applied = out["index"], out["apply"]
  signed = np.isin(np.array(ra.OPS)[index], SIGNED) & applied
  return dict(names=list(ra.OPS), index=index, applied=applied,
              magnitude=out["level"][applied].astype(np.float64), sign=out["sign"][signed])


def sampling_stats(ours: dict, theirs: dict) -> list[dict]:
  """Both samplers against the spec (chi-square / binomial / KS) and against each other."""
  from scipy import stats
  rows = []
  k = len(ours["names"])
  assert ours["names"] == theirs["names"], (ours["names"], theirs["names"])
  for who, d in (("ours", ours), ("timm", theirs)):
    counts = np.bincount(d["index"], minlength=k)
    rows.append(dict(stat=f"{who}: op choice uniform over {k} (chi-square, {k - 1} dof)",
                     value=f"n={counts.sum()}, min/max count {counts.min()}/{counts.max()}",
                     p=float(stats.chisquare(counts).pvalue)))
    rows.append(dict(stat=f"{who}: layer applied with p 0.5 (binomial)",
                     value=f"{d['applied'].mean():.4f} of {d['applied'].size}",
                     p=float(stats.binomtest(int(d["applied"].sum()), d["applied"].size,
                                             0.5).pvalue)))
    m = d["magnitude"]
    # N(9, 0.5) clipped to [0, 10]: a point mass 1 - Phi(2) at 10 (tested as a binomial)
    # and below it the normal truncated to [0, 10) (KS, which needs a continuous CDF).
    at_top = 1.0 - stats.norm.cdf(2.0)
    rows.append(dict(stat=f"{who}: magnitude clipped to 10 with p 1 - Phi(2) = {at_top:.4f} "
                     "(binomial)", value=f"{np.mean(m >= 10):.4f} of {m.size}",
                     p=float(stats.binomtest(int((m >= 10).sum()), m.size, at_top).pvalue)))
    below = m[m < 10]
    rows.append(dict(stat=f"{who}: magnitude below 10 ~ N(9, 0.5) truncated to [0, 10) (KS)",
                     value=f"mean {below.mean():.3f} std {below.std():.3f}",
                     p=float(stats.kstest(below, truncated_normal_cdf).pvalue)))
    rows.append(dict(stat=f"{who}: sign of signed ops +-1 with p 0.5 (binomial)",
                     value=f"{np.mean(d['sign'] > 0):.4f} of {d['sign'].size}",
                     p=float(stats.binomtest(int((d["sign"] > 0).sum()), d["sign"].size,
                                             0.5).pvalue)))
  counts = np.stack([np.bincount(d["index"], minlength=k) for d in (ours, theirs)])
  rows.append(dict(stat="ours vs timm: op counts (chi-square contingency)",
                   value=f"{counts.sum()} draws", p=float(stats.chi2_contingency(counts).pvalue)))
  below = [d["magnitude"][d["magnitude"] < 10] for d in (ours, theirs)]
  rows.append(dict(stat="ours vs timm: magnitudes below 10 (two-sample KS)",
                   value=f"{below[0].size} / {below[1].size}",
                   p=float(stats.ks_2samp(*below).pvalue)))
  return rows


def truncated_normal_cdf(x, mean=9.0, std=0.5, high=10.0):
  """CDF of N(mean, std) conditioned on [0, high)."""
  from scipy import stats
  low_mass, high_mass = stats.norm.cdf([0.0, high], mean, std)
  cdf = (stats.norm.cdf(np.asarray(x, np.float64), mean, std) - low_mass) / (high_mass - low_mass)
  return np.clip(cdf, 0.0, 1.0)


def level_mapping_gap(tf, aa) -> int:
  """Count of (op, level, sign) where ``randaugment.level_to_arg`` differs from timm's
  ``LEVEL_TO_ARG`` over levels 0..10 in steps of 0.01 (float32-representable levels)."""
  from ofq_jax.data import randaugment as ra
  levels = np.arange(0, 1001, dtype=np.float32) / np.float32(100)
  hparams = timm_hparams(aa)
  bad = 0
  for name in ra.OPS:
    if name in NO_MAGNITUDE:
      continue
    for sign in ((1.0, -1.0) if name in SIGNED else (1.0,)):
      ours = ra.level_to_arg(tf, name, tf.constant(levels), sign).numpy()
      with forced_sign(aa, sign):
        theirs = np.array([aa.LEVEL_TO_ARG[name](float(lv), hparams)[0] for lv in levels])
      bad += int(np.sum(ours != theirs))
  return bad


def versions() -> dict:
  out = {}
  for pkg in ("timm", "pillow", "tensorflow-cpu", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def table(rows, columns) -> str:
  lines = ["| " + " | ".join(c for c, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(fmt(row) for _, fmt in columns) + " |")
  return "\n".join(lines)


OP_COLUMNS = [
    ("op", lambda r: r["op"]),
    ("magnitudes", lambda r: r["magnitudes"]),
    ("max abs diff", lambda r: str(r["max_abs"])),
    ("mean abs diff", lambda r: f"{r['mean_abs']:.5f}"),
    ("values differing", lambda r: f"{100 * r['frac_differing']:.4f} %"),
    ("bound", lambda r: r["bound"]),
    ("pass", lambda r: "pass" if r["passed"] else "FAIL"),
    ("note", lambda r: r["note"] + (f"; vs timm bicubic: mean {r['bicubic_mean_abs']:.2f}"
                                    if "bicubic_mean_abs" in r else "")),
]
SAMPLING_COLUMNS = [("statistic", lambda r: r["stat"]), ("value", lambda r: r["value"]),
                    ("p-value", lambda r: f"{r['p']:.3g}")]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
  parser.add_argument("--draws", type=int, default=5000,
                      help="RandAugment calls per sampler (2 layers each)")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  start = time.time()
  aa = load_timm_auto_augment()
  hparams = timm_hparams(aa)
  images = make_images("bench")
  from ofq_jax.data import randaugment as ra
  rows = []
  for name in ra.OPS:
    row = compare_op(tf, aa, hparams, name, images)
    if name in GEOMETRIC:
      row["bicubic_mean_abs"] = bicubic_gap(tf, aa, hparams, name, images)
    rows.append(row)
  sampling = sampling_stats(our_draws(tf, args.draws), timm_draws(aa, args.draws))
  mapping_gap = level_mapping_gap(tf, aa)
  result = dict(spec=SPEC, versions=versions(), images=list(images),
                hparams={k: str(v) for k, v in hparams.items()}, ops=rows,
                sampling=sampling, level_mapping_mismatches=mapping_gap,
                seconds=round(time.time() - start, 1))
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(f"RandAugment {SPEC}: ofq_jax vs timm {result['versions']['timm']} "
          f"(Pillow {result['versions']['pillow']}); images: {', '.join(images)}\n")
    print(table(rows, OP_COLUMNS))
    print()
    print(table(sampling, SAMPLING_COLUMNS))
    print(f"\nlevel -> argument mismatches vs timm's LEVEL_TO_ARG (levels 0..10 step 0.01, "
          f"both signs): {mapping_gap}")
    print(f"{result['seconds']} s")
  return result


if __name__ == "__main__":
  main()
