"""The imagenet2012 pipeline on a tiny dataset these tests make themselves: generated
JPEGs packed in the ``ILSVRC2012_img_train.tar`` / ``ILSVRC2012_img_val.tar`` layout and
prepared by tfds's own builder from ``manual_dir``."""

import sys

import ml_collections
import numpy as np
import pytest

from ofq_jax import train
from ofq_jax.data import build
from ofq_jax.data.fake_imagenet import write_fake_imagenet
from ofq_jax.errors import MissingInputError
from ofq_jax.data.imagenet import (eval_resize_and_crop, mixup_cutmix, random_crop_window,
                                   random_erasing)
from support.runs import digits_config, imagenet_config, set_fields

CLASSES = 3
PER_CLASS = 4
VAL_IMAGES = 7


@pytest.fixture(scope="module")
def imagenet_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  manual = write_fake_imagenet(str(root / "manual"), classes=CLASSES, per_class=PER_CLASS,
                               val_images=VAL_IMAGES)
  return manual, str(root / "tfds")


def data_config(manual, data_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=data_dir, manual_dir=manual, image_size=32,
      eval_resize=36, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
      interpolation="random", hflip=0.5, randaugment="", random_erasing=0.25, mixup=0.0,
      cutmix=0.0, repeated_aug=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
  config.update(overrides)
  return config


def test_prepared_sizes_and_train_batches(imagenet_dirs):
  source = build(data_config(*imagenet_dirs))
  assert (source.train_size, source.eval_size) == (CLASSES * PER_CLASS, VAL_IMAGES)
  batches = source.train_batches(global_batch=4, start_step=0, seed=0)
  first = [next(batches) for _ in range(3)]
  assert first[0]["image"].shape == (4, 32, 32, 3) and first[0]["label"].dtype == np.int32
  assert set(np.concatenate([b["label"] for b in first])) <= {0, 1, 2, 3, 4, 5}
  # Resuming at step 2 yields what an uninterrupted run yields at step 2.
  resumed = next(source.train_batches(global_batch=4, start_step=2, seed=0))
  np.testing.assert_array_equal(resumed["image"], first[2]["image"])


def test_horizontal_flip(imagenet_dirs):
  """hflip=1 mirrors exactly what hflip=0 yields for the same seed (same crops)."""
  plain = dict(randaugment="", random_erasing=0.0)
  kept = next(build(data_config(*imagenet_dirs, hflip=0.0, **plain)).train_batches(
      global_batch=4, start_step=0, seed=5))
  flipped = next(build(data_config(*imagenet_dirs, hflip=1.0, **plain)).train_batches(
      global_batch=4, start_step=0, seed=5))
  np.testing.assert_array_equal(flipped["label"], kept["label"])
  np.testing.assert_allclose(flipped["image"], kept["image"][:, :, ::-1], atol=1e-6)


def test_repeated_augmentation_multiplicity(imagenet_dirs):
  """repeated_aug=3: every image comes three times in a row, each copy augmented anew."""
  source = build(data_config(*imagenet_dirs, repeated_aug=3, hflip=0.0, random_erasing=0.0))
  batch = next(source.train_batches(global_batch=12, start_step=0, seed=3))
  labels = batch["label"].reshape(4, 3)
  assert np.all(labels == labels[:, :1])
  images = batch["image"].reshape(4, 3, -1)
  assert not np.allclose(images[:, 0], images[:, 1])


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_label_mass_and_pixels(mixup, cutmix):
  """Soft targets sum to 1 per example, put lam (+ smoothing) on the own class and
  1 - lam on the reversed partner's; cutmix pastes partner pixels in a box whose area
  matches 1 - lam; mixup blends pixels with the same lam."""
  import tensorflow as tf
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(6, 16, 16, 3)), tf.float32)
  labels = tf.constant([0, 1, 2, 3, 4, 5], tf.int32)
  for i in range(20):
    out = mixup_cutmix(tf, {"image": images, "label": labels}, tf.constant([i, 7], tf.int64),
                       num_classes=10, mixup_alpha=mixup, cutmix_alpha=cutmix,
                       label_smoothing=0.1)
    soft = out["label_soft"].numpy()
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    off = 0.1 / 10
    lam = (soft[0, 0] - off) / 0.9
    np.testing.assert_allclose((soft[0, 5] - off) / 0.9, 1 - lam, atol=1e-5)
    mixed, original = out["image"].numpy(), images.numpy()
    partner = original[::-1]
    is_mixup = np.allclose(mixed, original * lam + partner * (1 - lam), atol=1e-5)
    if cutmix == 0.0:
      assert is_mixup
    if not is_mixup:  # cutmix: every pixel is its own or the partner's
      from_partner = np.isclose(mixed, partner).all(-1) & ~np.isclose(mixed, original).all(-1)
      assert np.all(np.isclose(mixed, original).all(-1) | from_partner)
      assert from_partner[0].mean() == pytest.approx(1 - lam, abs=1e-5)


@pytest.mark.parametrize("hosts", [1, 2])
def test_eval_counts_every_image_once(imagenet_dirs, hosts):
  source = build(data_config(*imagenet_dirs))
  total, shapes = 0.0, set()
  for index in range(hosts):
    for batch in source.eval_batches(global_batch=4, process_index=index, process_count=hosts):
      total += batch["mask"].sum()
      shapes.add(batch["image"].shape)
  assert total == VAL_IMAGES
  assert shapes == {(4 // hosts, 32, 32, 3)}


def test_missing_files_are_named(tmp_path):
  with pytest.raises(MissingInputError, match="ILSVRC2012_img_train.tar and "
                     "ILSVRC2012_img_val.tar"):
    build(data_config(str(tmp_path / "nothing"), str(tmp_path / "tfds")))


def test_imagenet_without_its_extra_names_the_install(tmp_path, monkeypatch):
  """Without tensorflow-datasets (the [imagenet] extra) ImageNet fails in one line."""
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises
  with pytest.raises(ImportError, match=r"^error: data.name='imagenet2012' needs "
                     r"tensorflow_datasets.*fix: pip install 'ofq_jax\[imagenet\]'$"):
    build(data_config(str(tmp_path), str(tmp_path / "tfds")))


def test_bad_randaugment_spec_fails_before_reading(imagenet_dirs):
  with pytest.raises(ValueError, match="only the 'increasing' op set"):
    build(data_config(*imagenet_dirs, randaugment="rand-m9"))


def test_random_resized_crop_scale_and_ratio():
  """Defining property: area fraction in [0.08, 1] and aspect ratio in [3/4, 4/3]
  (up to integer rounding of the window)."""
  import tensorflow as tf
  areas, ratios = [], []
  for i in range(300):
    _, _, h, w = random_crop_window(tf, tf.constant([300, 400, 3]), tf.constant([0, i]))
    h, w = int(h), int(w)
    areas.append(h * w / (300 * 400))
    ratios.append(w / h)
  assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
  assert min(ratios) >= 0.75 - 0.02 and max(ratios) <= 4 / 3 + 0.02
  assert max(areas) - min(areas) > 0.5  # the range is actually explored


def test_random_erasing_area_and_probability():
  """Erased boxes cover 2 %-33 % of the image; about a quarter of images at p = 0.25."""
  import tensorflow as tf
  image = tf.fill([64, 64, 3], 100.0)
  fractions = []
  for i in range(200):
    out = random_erasing(tf, image, tf.constant([1, i], tf.int64), 1.0)
    fractions.append(float(tf.reduce_mean(tf.cast(out[..., 0] != 100.0, tf.float32))))
  fractions = np.array(fractions)
  assert np.all(fractions > 0) and fractions.min() >= 0.015 and fractions.max() <= 0.34
  erased = [bool(tf.reduce_any(random_erasing(tf, image, tf.constant([2, i], tf.int64), 0.25)
                               != 100.0)) for i in range(400)]
  assert abs(np.mean(erased) - 0.25) < 0.06


def test_eval_crop_geometry():
  """Shorter side to 248 (bicubic), centre 224 x 224: a bright centre stays centred."""
  import tensorflow as tf
  image = np.zeros((300, 500, 3), np.uint8)
  image[140:160, 240:260] = 255
  out = eval_resize_and_crop(tf, tf.constant(image), 248, 224).numpy()
  assert out.shape == (224, 224, 3)
  ys, xs = np.nonzero(out[..., 0] > 128)
  assert abs(ys.mean() - 111.5) < 2 and abs(xs.mean() - 111.5) < 2


TINY_MODEL = {"model.embed_dim": 64, "model.depth": 2, "model.num_heads": 2,
              "model.patch_size": 8, "model.img_size": 32, "data.image_size": 32,
              "data.eval_resize": 36, "batch_size": 8, "eval_batch_size": 8,
              "log_every_steps": 1, "checkpoint_every_steps": 100, "tensorboard": False}


@pytest.fixture(scope="module")
def tiny_teacher(imagenet_dirs, tmp_path_factory):
  """A float tiny DeiT (1000 classes, 32 px) trained 3 steps on the tiny ImageNet."""
  workdir = tmp_path_factory.mktemp("imagenet_teacher")
  config = set_fields(digits_config(stages=("float",)), TINY_MODEL)
  config.data = data_config(*imagenet_dirs)
  config.model.num_classes = 1000
  summary = train.train_and_evaluate(config, str(workdir))
  assert 0.0 <= summary["float_top1"] <= 100.0
  return str(workdir / "models" / "float")


@pytest.mark.parametrize("model,bits", [("tiny", 2), ("small", 3)])
def test_every_recipe_runs_two_steps(model, bits, imagenet_dirs, tiny_teacher, tmp_path):
  """Each distinct DeiT training setup of the table as written (its augmentation,
  optimizer, KD, quantization) with a tiny model and the tiny dataset: 2 QAT steps, and
  for the first 2 CGA steps after. With the model shrunk, the other rows differ from
  these two only in bits, lr and batch (tests/unit/test_recipes.py checks every row's
  config); tiny-2 is the no-mixup setup, small-3 the mixup / cutmix / repeated-aug one."""
  config = set_fields(imagenet_config(model, bits), {**TINY_MODEL, "num_train_steps": 2})
  config.data.data_dir, config.data.manual_dir = imagenet_dirs[1], imagenet_dirs[0]
  config.qat.teacher = tiny_teacher
  with_cga = (model, bits) == ("tiny", 2)
  config.stages = ("qat", "cga") if with_cga else ("qat",)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary["qat_top1"] <= 100.0
  if with_cga:
    assert 0.0 <= summary["cga_top1"] <= 100.0 and 0.0 < summary["frozen_fraction"] <= 1.0
