"""timm's RandAugment (``rand-m9-mstd0.5-inc1``) as stateless TensorFlow ops.

timm semantics (the 15 "increasing" ops are the same in timm 0.5.4, OFQ's version, and
timm 1.0): ``n`` layers (default 2), each picks one of the 15 ops uniformly (with
replacement) and applies it with probability 0.5 at magnitude ``m ~ N(m, mstd)`` clipped
to [0, 10]; signed ops negate their argument with probability 0.5. Images are float32 RGB
holding uint8 values (0..255). Each op reproduces the arithmetic of timm's PIL
implementation, so its result equals PIL's uint8 image (``bench/randaugment_vs_timm.py``):
level -> argument mappings in float64 as Python computes them, PIL's blends in float32
truncated to uint8, PIL's "L" conversion and its SMOOTH filter in integers, and PIL's
bilinear affine resampling (pixel centres at +0.5, edge taps clamped, timm's ``img_mean``
(124, 116, 104) outside the image, truncated). Deviation: geometric ops resample bilinearly
only, where timm draws bilinear or bicubic (``train_interpolation='random'``).
"""

from __future__ import annotations

import math
import re

MAX_LEVEL = 10.0
FILL = (124.0, 116.0, 104.0)
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
TRANSLATE_PCT = 0.45  # timm's default ``translate_pct`` (ImageNet RandAugment keeps it)


def parse(spec: str) -> dict[str, float]:
  """``rand-m9-mstd0.5-inc1`` -> ``{'m': 9, 'mstd': 0.5, 'n': 2, 'inc': 1, 'p': 0.5}``."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-' (timm syntax).")
  out = {"m": 10.0, "mstd": 0.0, "n": 2.0, "inc": 0.0, "p": 0.5}
  for part in parts[1:]:
    match = re.fullmatch(r"(mstd|inc|m|n|p)([\d.]+)", part)
    if not match:
      raise ValueError(f"Unknown RandAugment field {part!r} in {spec!r}.")
    out[match.group(1)] = float(match.group(2))
  if not out["inc"]:
    raise ValueError(f"{spec!r}: only the 'increasing' op set (inc1) is implemented.")
  return out


def level_to_arg(tf, name: str, level, sign=1.0):
  """timm's ``LEVEL_TO_ARG[name](level)`` with ``_randomly_negate`` resolved by ``sign``
  (+-1), in float64 as Python computes it; None for the ops without an argument. Works on a
  scalar or a vector of levels."""
  frac = _div(tf, tf.cast(level, tf.float64), MAX_LEVEL)
  sign = tf.cast(sign, tf.float64)
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":  # degrees, [-30, 30]
    return sign * (frac * 30.0)
  if name == "PosterizeIncreasing":  # bits kept, 4 .. 0
    return 4.0 - tf.floor(frac * 4.0)
  if name == "SolarizeIncreasing":  # threshold, 256 .. 0
    return 256.0 - tf.minimum(tf.floor(frac * 256.0), 256.0)
  if name == "SolarizeAdd":  # added to values < 128, 0 .. 110
    return tf.minimum(tf.floor(frac * 110.0), 128.0)
  if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing"):  # blend factor, [0.1, 1.9]
    return tf.maximum(1.0 + sign * (frac * 0.9), 0.1)
  if name in ("ShearX", "ShearY"):  # [-0.3, 0.3]
    return sign * (frac * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):  # fraction of the side, [-0.45, 0.45]
    return sign * (frac * TRANSLATE_PCT)
  raise ValueError(name)


def _div(tf, x, constant: float):
  """``x / constant`` rounded as Python rounds it. Inside tf.function / tf.data, Grappler's
  constant folding turns a division by a constant into a multiplication by its reciprocal
  (``level / 10`` -> ``level * 0.1``: 0.30000000000000004 instead of 0.3 at level 3);
  DivNoNan is left alone."""
  return tf.math.divide_no_nan(x, tf.constant(constant, x.dtype))


def _blend(tf, degenerate, image, factor):
  """PIL's ``Image.blend(degenerate, image, factor)``: float32 ``d + a * (i - d)``, clipped
  and truncated to uint8 (``ImagingBlend``)."""
  alpha = tf.cast(factor, tf.float32)
  return tf.floor(tf.clip_by_value(degenerate + alpha * (image - degenerate), 0.0, 255.0))


def _gray(tf, image):
  """PIL's RGB -> "L": ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``."""
  rgb = tf.cast(image, tf.int32)
  weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 0x8000
  return tf.cast(tf.bitwise.right_shift(weighted, 16), tf.float32)


def auto_contrast(tf, image):
  """PIL's ``ImageOps.autocontrast`` (cutoff 0), per channel: value ``int(v * scale +
  offset)`` with ``scale = 255 / (hi - lo)``, ``offset = -lo * scale`` in float64."""
  values = tf.cast(image, tf.float64)
  lo = tf.reduce_min(values, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(values, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  stretched = tf.clip_by_value(tf.floor(values * scale + offset), 0.0, 255.0)
  return tf.cast(tf.where(hi > lo, stretched, values), tf.float32)


def equalize(tf, image):
  """PIL ImageOps.equalize, per channel."""
  def channel(c):
    values = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(hist) - nonzero[-1]) // 255
    before = tf.concat([[0], tf.cumsum(hist)[:-1]], 0)
    lut = tf.minimum((before + step // 2) // tf.maximum(step, 1), 255)
    mapped = tf.cast(tf.gather(lut, values), tf.float32)
    return tf.where(step == 0, c, mapped)
  return tf.stack([channel(image[..., i]) for i in range(3)], -1)


def posterize(tf, image, bits):
  """Keep the top ``bits`` bits. 0 bits (magnitude 10) gives black, as ``ImageOps.posterize``
  did in OFQ's Pillow 9.0.1 (Pillow 13 raises ValueError for bits=0)."""
  shift = tf.cast(8 - tf.cast(bits, tf.int32), tf.int32)
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift),
                 tf.float32)


def solarize(tf, image, threshold):
  return tf.where(image >= tf.cast(threshold, tf.float32), 255.0 - image, image)


def solarize_add(tf, image, addition, threshold=128.0):
  addition = tf.cast(addition, tf.float32)
  return tf.where(image < threshold, tf.minimum(image + addition, 255.0), image)


def contrast(tf, image, factor):
  """PIL's ``ImageEnhance.Contrast``: blend with the grey level ``int(mean(L) + 0.5)``."""
  gray = tf.cast(_gray(tf, image), tf.int64)
  mean = tf.cast(tf.reduce_sum(gray), tf.float64) / tf.cast(tf.size(gray), tf.float64)
  degenerate = tf.cast(tf.floor(mean + 0.5), tf.float32)
  return _blend(tf, tf.fill(tf.shape(image), degenerate), image, factor)


def color(tf, image, factor):
  """PIL's ``ImageEnhance.Color``: blend with the image's "L" conversion."""
  return _blend(tf, _gray(tf, image), image, factor)


def brightness(tf, image, factor):
  """PIL's ``ImageEnhance.Brightness``: blend with black."""
  return _blend(tf, tf.zeros_like(image), image, factor)


def sharpness(tf, image, factor):
  """PIL's ``ImageEnhance.Sharpness``: blend with ``ImageFilter.SMOOTH`` (kernel
  [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded; the 1-pixel border is copied)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  total = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  # round(total / 13) in integers; PIL's float32 sum + 0.5, truncated, is the same since
  # total / 13 + 0.5 is never nearer than 1/26 to an integer.
  smooth = tf.cast((tf.cast(total, tf.int32) * 2 + 13) // 26, tf.float32)
  padded = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([height - 2, width - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]])
  return _blend(tf, tf.where(inner, padded, image), image, factor)


def affine(tf, image, matrix):
  """PIL's ``Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=FILL)``.

  ``matrix`` (a, b, c, d, e, f) maps the output pixel centre (x + 0.5, y + 0.5) to the input
  point (a x' + b y' + c, d x' + e y' + f) in PIL's coordinates (pixel i spans [i, i + 1]).
  Points outside [0, width) x [0, height) get the fill colour; inside, the 4 taps around the
  point are clamped to the image and interpolated in float64, then truncated, as PIL does.
  """
  a, b, c, d, e, f = (tf.cast(m, tf.float64) for m in matrix)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  # Full-size operands: with mixed shapes Grappler's arithmetic optimizer regroups the sum
  # (scalar + column first) and rounds differently from PIL's (a x + b y) + c.
  ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float64) + 0.5,
                       tf.range(w, dtype=tf.float64) + 0.5, indexing="ij")
  x_in = a * xs + b * ys + tf.fill(tf.shape(xs), c)
  y_in = d * xs + e * ys + tf.fill(tf.shape(xs), f)
  inside = (x_in >= 0.0) & (x_in < w) & (y_in >= 0.0) & (y_in < h)
  x_in, y_in = x_in - 0.5, y_in - 0.5
  x_floor, y_floor = tf.floor(x_in), tf.floor(y_in)
  dx, dy = (x_in - x_floor)[..., None], (y_in - y_floor)[..., None]
  # Clip before the int cast: outside points may lie far away (they are filled anyway).
  x0 = tf.cast(tf.clip_by_value(x_floor, -1.0, w), tf.int32)
  y0 = tf.cast(tf.clip_by_value(y_floor, -1.0, h), tf.int32)
  x1 = tf.clip_by_value(x0 + 1, 0, width - 1)
  y1 = tf.clip_by_value(y0 + 1, 0, height - 1)
  x0 = tf.clip_by_value(x0, 0, width - 1)
  y0 = tf.clip_by_value(y0, 0, height - 1)
  pixels = tf.reshape(tf.cast(image, tf.float64), [-1, 3])

  def tap(y, x):
    return tf.gather(pixels, y * width + x)

  top, bottom = tap(y0, x0), tap(y1, x0)
  top = top + (tap(y0, x1) - top) * dx
  bottom = bottom + (tap(y1, x1) - bottom) * dx
  value = tf.cast(tf.floor(top + (bottom - top) * dy), tf.float32)
  return tf.where(inside[..., None], value, tf.constant(FILL, tf.float32))


def _round15(tf, x):
  """Python's ``round(x, 15)`` for |x| <= 1 (to the last bit but for exact ties)."""
  return _div(tf, tf.round(x * 1e15), 1e15)


def rotate(tf, image, degrees):
  """PIL's ``Image.rotate(degrees, BILINEAR, fillcolor=FILL)``: counter-clockwise about the
  centre (width / 2, height / 2), its matrix built as PIL builds it."""
  height = tf.cast(tf.shape(image)[0], tf.float64)
  width = tf.cast(tf.shape(image)[1], tf.float64)
  angle = -(tf.math.floormod(tf.cast(degrees, tf.float64), 360.0) * (math.pi / 180.0))
  cos, sin = _round15(tf, tf.cos(angle)), _round15(tf, tf.sin(angle))
  cx, cy = width / 2.0, height / 2.0
  c = cos * -cx + sin * -cy + 0.0 + cx
  f = -sin * -cx + cos * -cy + 0.0 + cy
  return affine(tf, image, [cos, sin, c, -sin, cos, f])


def _op(tf, name, image, level, sign):
  """One op at magnitude ``level`` (0..10); ``sign`` is the random +-1 of signed ops."""
  arg = level_to_arg(tf, name, level, sign)
  one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
  if name == "AutoContrast":
    return auto_contrast(tf, image)
  if name == "Equalize":
    return equalize(tf, image)
  if name == "Invert":
    return 255.0 - image
  if name == "Rotate":
    return rotate(tf, image, arg)
  if name == "PosterizeIncreasing":
    return posterize(tf, image, arg)
  if name == "SolarizeIncreasing":
    return solarize(tf, image, arg)
  if name == "SolarizeAdd":
    return solarize_add(tf, image, arg)
  if name == "ColorIncreasing":
    return color(tf, image, arg)
  if name == "ContrastIncreasing":
    return contrast(tf, image, arg)
  if name == "BrightnessIncreasing":
    return brightness(tf, image, arg)
  if name == "SharpnessIncreasing":
    return sharpness(tf, image, arg)
  if name == "ShearX":
    return affine(tf, image, [one, arg, zero, zero, one, zero])
  if name == "ShearY":
    return affine(tf, image, [one, zero, zero, arg, one, zero])
  if name == "TranslateXRel":  # timm: pixels = pct * width
    pixels = arg * tf.cast(tf.shape(image)[1], tf.float64)
    return affine(tf, image, [one, zero, pixels, zero, one, zero])
  if name == "TranslateYRel":
    pixels = arg * tf.cast(tf.shape(image)[0], tf.float64)
    return affine(tf, image, [one, zero, zero, zero, one, pixels])
  raise ValueError(name)


def apply_op(tf, name: str, image, level, sign=1.0):
  """``_op`` on uint8 values (float32), its result clipped to uint8 values."""
  out = _op(tf, name, image, tf.cast(level, tf.float32), tf.cast(sign, tf.float32))
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def draw(tf, seed, spec: str = "rand-m9-mstd0.5-inc1"):
  """The random choices of one ``randaugment`` call, stateless in ``seed``: per layer the op
  ``index`` into OPS, whether it is applied (``apply``), its magnitude ``level`` and the
  ``sign`` of signed ops (shape ``[n]`` each)."""
  params = parse(spec)
  layers = int(params["n"])
  keys = tf.random.experimental.stateless_split(seed, 4 * layers)
  out = {"index": [], "apply": [], "level": [], "sign": []}
  for layer in range(layers):
    k_op, k_apply, k_mag, k_sign = (keys[4 * layer + i] for i in range(4))
    out["index"].append(tf.random.stateless_uniform([], k_op, 0, len(OPS), tf.int32))
    level = tf.constant(params["m"], tf.float32)
    if params["mstd"] > 0:
      level = level + params["mstd"] * tf.random.stateless_normal([], k_mag)
    out["level"].append(tf.clip_by_value(level, 0.0, MAX_LEVEL))
    out["sign"].append(tf.where(tf.random.stateless_uniform([], k_sign) < 0.5, -1.0, 1.0))
    out["apply"].append(tf.random.stateless_uniform([], k_apply) < params["p"])
  return {k: tf.stack(v) for k, v in out.items()}


def randaugment(tf, image, seed, spec: str = "rand-m9-mstd0.5-inc1"):
  """timm RandAugment of one image (float32, uint8 values), stateless in ``seed``."""
  choices = draw(tf, seed, spec)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  for layer in range(int(parse(spec)["n"])):
    level, sign = choices["level"][layer], choices["sign"][layer]
    branches = [lambda name=name: apply_op(tf, name, image, level, sign) for name in OPS]
    augmented = tf.switch_case(choices["index"][layer], branches)
    image = tf.where(choices["apply"][layer], augmented, image)
  return image
