"""timm's RandAugment (``rand-m9-mstd0.5-inc1``) as stateless TensorFlow ops.

timm 0.5.4 semantics: ``n`` layers (default 2), each picks one of the 15 "increasing"
ops uniformly (with replacement) and applies it with probability 0.5 at magnitude
``m ~ N(m, mstd)`` clipped to [0, 10]. Images are float32 RGB with uint8 values
(0..255, rounded after every op as PIL's uint8 images are); geometric ops fill with
timm's ``img_mean`` (124, 116, 104). Deviation: geometric ops resample bilinearly
(TF's projective transform has no bicubic), where timm draws bilinear or bicubic.
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


def _blend(tf, degenerate, image, factor):
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _gray(tf, image):  # PIL "L": (299 R + 587 G + 114 B) / 1000
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)


def auto_contrast(tf, image):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1e-6)
  return tf.where(hi > lo, scaled, image)


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
  shift = tf.cast(8 - bits, tf.int32)
  values = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift),
                 tf.float32)


def solarize(tf, image, threshold):
  return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(tf, image, addition, threshold=128.0):
  return tf.where(image < threshold, tf.minimum(image + addition, 255.0), image)


def contrast(tf, image, factor):
  mean = tf.floor(tf.reduce_mean(tf.round(_gray(tf, image))) + 0.5)
  return _blend(tf, tf.fill(tf.shape(image), mean), image, factor)


def sharpness(tf, image, factor):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.round(smooth)
  padded = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([height - 2, width - 2, 1], tf.bool), [[1, 1], [1, 1], [0, 0]])
  return _blend(tf, tf.where(inner, padded, image), image, factor)


def affine(tf, image, matrix):
  """PIL-style affine: ``matrix`` (a, b, c, d, e, f) maps output (x, y) to input
  (a x + b y + c, d x + e y + f); outside pixels get the fill colour."""
  transform = tf.concat([tf.stack(matrix), tf.zeros([2])], 0)[None]
  shape = tf.shape(image)[:2]
  channels = [tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None, :, :, i:i + 1], transforms=transform, output_shape=shape,
      fill_value=fill, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
      for i, fill in enumerate(FILL)]
  return tf.concat(channels, -1)


def rotate(tf, image, degrees):
  """Counter-clockwise about the centre, as PIL's ``Image.rotate``."""
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = width / 2.0 - 0.5, height / 2.0 - 0.5
  return affine(tf, image, [cos, sin, cx - cos * cx - sin * cy,
                            -sin, cos, cy + sin * cx - cos * cy])


def _op(tf, name, image, level, sign):
  """One op at magnitude ``level`` (0..10); ``sign`` is the random +-1 of signed ops."""
  frac = level / MAX_LEVEL
  zero, one = tf.constant(0.0), tf.constant(1.0)
  if name == "AutoContrast":
    return auto_contrast(tf, image)
  if name == "Equalize":
    return equalize(tf, image)
  if name == "Invert":
    return 255.0 - image
  if name == "Rotate":
    return rotate(tf, image, sign * frac * 30.0)
  if name == "PosterizeIncreasing":
    return posterize(tf, image, 4 - tf.cast(frac * 4.0, tf.int32))
  if name == "SolarizeIncreasing":
    return solarize(tf, image, 256.0 - tf.floor(frac * 256.0))
  if name == "SolarizeAdd":
    return solarize_add(tf, image, tf.floor(frac * 110.0))
  factor = 1.0 + sign * frac * 0.9
  if name == "ColorIncreasing":
    return _blend(tf, _gray(tf, image), image, factor)
  if name == "ContrastIncreasing":
    return contrast(tf, image, factor)
  if name == "BrightnessIncreasing":
    return _blend(tf, tf.zeros_like(image), image, factor)
  if name == "SharpnessIncreasing":
    return sharpness(tf, image, factor)
  shear = sign * frac * 0.3
  if name == "ShearX":
    return affine(tf, image, [one, shear, zero, zero, one, zero])
  if name == "ShearY":
    return affine(tf, image, [one, zero, zero, shear, one, zero])
  width = tf.cast(tf.shape(image)[1], tf.float32)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  shift = sign * frac * 0.45
  if name == "TranslateXRel":
    return affine(tf, image, [one, zero, shift * width, zero, one, zero])
  if name == "TranslateYRel":
    return affine(tf, image, [one, zero, zero, zero, one, shift * height])
  raise ValueError(name)


def apply_op(tf, name: str, image, level, sign=1.0):
  """``_op`` followed by PIL's uint8 rounding."""
  out = _op(tf, name, image, tf.cast(level, tf.float32), tf.cast(sign, tf.float32))
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def randaugment(tf, image, seed, spec: str = "rand-m9-mstd0.5-inc1"):
  """timm RandAugment of one image (float32, uint8 values), stateless in ``seed``."""
  params = parse(spec)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  layers = int(params["n"])
  keys = tf.random.experimental.stateless_split(seed, 4 * layers)
  for layer in range(layers):
    k_op, k_apply, k_mag, k_sign = (keys[4 * layer + i] for i in range(4))
    index = tf.random.stateless_uniform([], k_op, 0, len(OPS), tf.int32)
    level = params["m"]
    if params["mstd"] > 0:
      level = level + params["mstd"] * tf.random.stateless_normal([], k_mag)
    level = tf.clip_by_value(tf.cast(level, tf.float32), 0.0, MAX_LEVEL)
    sign = tf.where(tf.random.stateless_uniform([], k_sign) < 0.5, -1.0, 1.0)
    branches = [lambda name=name: apply_op(tf, name, image, level, sign) for name in OPS]
    augmented = tf.switch_case(index, branches)
    apply = tf.random.stateless_uniform([], k_apply) < params["p"]
    image = tf.where(apply, augmented, image)
  return image
