"""RandAugment ops: each op's defining property, checked by hand-made images."""

import numpy as np
import pytest
import tensorflow as tf

from ofq_jax.data import randaugment as ra

RNG = np.random.default_rng(0)
IMAGE = tf.constant(RNG.integers(0, 256, size=(32, 40, 3)).astype(np.float32))


def op(name, image=IMAGE, level=10.0, sign=1.0):
  return ra.apply_op(tf, name, image, level, sign).numpy()


def test_parse():
  assert ra.parse("rand-m9-mstd0.5-inc1") == {"m": 9.0, "mstd": 0.5, "n": 2.0, "inc": 1.0,
                                               "p": 0.5}
  with pytest.raises(ValueError, match="only the 'increasing'"):
    ra.parse("rand-m9")
  with pytest.raises(ValueError, match="Unknown RandAugment field"):
    ra.parse("rand-m9-x3-inc1")


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
                                  "BrightnessIncreasing", "SharpnessIncreasing",
                                  "SolarizeAdd"])
def test_magnitude_zero_is_identity(name):
  np.testing.assert_allclose(op(name, level=0.0), IMAGE.numpy(), atol=1e-3)


def test_pixel_ops():
  np.testing.assert_array_equal(op("Invert"), 255 - IMAGE.numpy())
  np.testing.assert_array_equal(op("SolarizeIncreasing", level=10.0), 255 - IMAGE.numpy())
  np.testing.assert_array_equal(op("SolarizeIncreasing", level=0.0), IMAGE.numpy())
  assert set(np.unique(op("PosterizeIncreasing", level=7.5))) <= {0.0, 128.0}  # 1 bit
  np.testing.assert_array_equal(op("PosterizeIncreasing", level=0.0) % 16, 0)  # 4 bits
  bright = op("BrightnessIncreasing", level=10.0, sign=-1.0)  # factor 0.1
  np.testing.assert_allclose(bright, np.round(IMAGE.numpy() * 0.1), atol=1.0)
  added = op("SolarizeAdd", level=10.0)
  low = IMAGE.numpy() < 128
  np.testing.assert_array_equal(added[low], np.minimum(IMAGE.numpy()[low] + 110, 255))
  np.testing.assert_array_equal(added[~low], IMAGE.numpy()[~low])
  gray = op("ColorIncreasing", level=10.0, sign=-1.0)  # factor 0.1: nearly gray
  assert np.std(gray, axis=-1).mean() < 0.2 * np.std(IMAGE.numpy(), axis=-1).mean()


def test_auto_contrast_and_equalize_spread_the_range():
  dull = tf.constant(RNG.integers(100, 140, size=(32, 32, 3)).astype(np.float32))
  stretched = op("AutoContrast", dull)
  assert stretched.min() == 0 and stretched.max() == 255
  equalized = op("Equalize", dull)
  # PIL's ImageOps.equalize, transcribed per channel: lut[i] = (step // 2 + count of
  # values below i) // step, step = (pixels - count of the top value) // 255.
  for c in range(3):
    values = dull.numpy()[..., c].astype(int)
    hist = np.bincount(values.ravel(), minlength=256)
    step = (hist.sum() - hist[np.nonzero(hist)[0][-1]]) // 255
    lut = np.minimum((step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step, 255)
    np.testing.assert_array_equal(equalized[..., c], lut[values])
  assert equalized.min() == 0 and equalized.max() == 255


def test_geometry():
  square = tf.constant(RNG.integers(0, 256, size=(31, 31, 3)).astype(np.float32))
  rotated = op("Rotate", square, level=10.0 * 90 / 30)  # 90 degrees counter-clockwise
  np.testing.assert_allclose(rotated, np.rot90(square.numpy(), k=1), atol=1.0)
  shifted = op("TranslateXRel", level=10.0 * 8 / (0.45 * 40))  # 8 px: input x = x + 8
  np.testing.assert_allclose(shifted[:, :32], IMAGE.numpy()[:, 8:], atol=1.0)
  np.testing.assert_allclose(shifted[:, 33:], np.broadcast_to(ra.FILL, (32, 7, 3)))


def test_randaugment_is_seeded_and_keeps_the_value_range():
  a = ra.randaugment(tf, IMAGE, tf.constant([0, 1], tf.int64)).numpy()
  b = ra.randaugment(tf, IMAGE, tf.constant([0, 1], tf.int64)).numpy()
  np.testing.assert_array_equal(a, b)
  assert a.shape == IMAGE.shape and a.min() >= 0 and a.max() <= 255
  assert np.all(a == np.round(a))
  changed = [not np.array_equal(ra.randaugment(tf, IMAGE, tf.constant([i, 2], tf.int64)),
                                IMAGE.numpy()) for i in range(40)]
  # Each of the 2 layers applies with p 0.5: ~75 % of images change.
  assert 0.5 < np.mean(changed) < 0.95


def test_randaugment_is_draw_then_apply_op():
  """``randaugment`` applies, layer by layer, the ops ``draw`` picks for the same seed."""
  for i in range(6):
    seed = tf.constant([i, 3], tf.int64)
    choices = {k: v.numpy() for k, v in ra.draw(tf, seed).items()}
    assert choices["index"].shape == (2,)
    expected = IMAGE
    for index, apply, level, sign in zip(choices["index"], choices["apply"],
                                         choices["level"], choices["sign"]):
      assert 0.0 <= level <= ra.MAX_LEVEL and sign in (-1.0, 1.0)
      if apply:
        expected = ra.apply_op(tf, ra.OPS[index], expected, level, sign)
    np.testing.assert_array_equal(ra.randaugment(tf, IMAGE, seed).numpy(), expected)


@pytest.mark.parametrize("name", ra.OPS)
def test_traced_op_equals_eager(name):
  """tf.data runs the ops traced, with an unknown image shape, after Grappler's rewrites
  (which e.g. turn ``x / 10`` into ``x * 0.1``): same values as eager."""
  traced = tf.function(lambda image, level, sign: ra.apply_op(tf, name, image, level, sign),
                       autograph=False,
                       input_signature=[tf.TensorSpec([None, None, 3], tf.float32),
                                        tf.TensorSpec([], tf.float32),
                                        tf.TensorSpec([], tf.float32)])
  for level, sign in ((3.0, 1.0), (7.3, -1.0), (10.0, -1.0)):
    np.testing.assert_array_equal(traced(IMAGE, level, sign).numpy(),
                                  op(name, level=level, sign=sign))
