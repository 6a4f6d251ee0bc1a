"""ImageNet-1k through tensorflow-datasets' ``imagenet2012`` builder and tf.data.

The user points ``data.manual_dir`` at ``ILSVRC2012_img_train.tar`` /
``ILSVRC2012_img_val.tar`` (prepared once into ``data.data_dir``), or ``data_dir`` at
an already prepared copy. Each process reads its own share
(``tfds.split_for_jax_process``). Training order and augmentation are seeded per
(seed, example index), so ``train_batches(start_step=k)`` resumes exactly.

Training transform, in timm's order: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3,
random bilinear / bicubic), horizontal flip, RandAugment (``randaugment.py``), ImageNet
normalisation, random erasing (pixel mode, after normalisation as timm does); repeated
augmentation; mixup / cutmix with smoothed soft targets (``label_soft``; mixed per
host-local batch where timm mixes per GPU batch). Eval: the shorter side resized to
``eval_resize`` (bicubic) and a centre crop, padded and masked so each validation image
counts once on any number of hosts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

from ofq_jax.data import Batch
from ofq_jax.data import optional
from ofq_jax.data import randaugment as randaugment_lib
from ofq_jax.errors import MissingInputError

EXPECTED_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def _tf():
  return optional.tensorflow()


def random_crop_window(tf, shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop's window ``(offset_y, offset_x, height, width)`` (10 tries,
  then the whole image), drawn with a stateless seed."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin[0], begin[1], size[0], size[1]


def random_erasing(tf, image, seed, probability: float, area=(0.02, 1 / 3),
                   log_ratio=(-1.2039728, 1.2039728)):
  """timm's RandomErasing, mode 'pixel', one box: with ``probability``, a box of
  ``area`` fraction and log aspect ratio in ``log_ratio`` (first of 10 tries that fits)
  is filled with per-pixel N(0, 1) noise (the image is already normalised)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  keys = tf.random.experimental.stateless_split(seed, 6)
  fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target = tf.random.stateless_uniform([10], keys[0], area[0], area[1]) * fh * fw
  ratio = tf.exp(tf.random.stateless_uniform([10], keys[1], log_ratio[0], log_ratio[1]))
  h = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  fits = (h < height) & (w < width)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = h[first], w[first]
  top = tf.random.stateless_uniform([], keys[2], 0, tf.maximum(height - h, 1), tf.int32)
  left = tf.random.stateless_uniform([], keys[3], 0, tf.maximum(width - w, 1), tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  apply = (tf.random.stateless_uniform([], keys[4]) < probability) & tf.reduce_any(fits)
  noise = tf.random.stateless_normal(tf.shape(image), keys[5])
  return tf.where(box[..., None] & apply, noise, image)


def mixup_cutmix(tf, batch, seed, *, num_classes: int, mixup_alpha: float,
                 cutmix_alpha: float, switch_prob: float = 0.5, prob: float = 1.0,
                 label_smoothing: float = 0.1):
  """timm's Mixup in 'batch' mode on one (host-local) batch.

  With probability ``prob`` the batch is mixed with its reverse: cutmix (a box of area
  ``1 - lam``, ``lam ~ Beta(cutmix_alpha)``, lam then corrected to the clipped box) with
  probability ``switch_prob`` when both are on, else mixup (``lam ~ Beta(mixup_alpha)``).
  Adds ``label_soft``: smoothed one-hots (off = smoothing / C, on = 1 - smoothing + off)
  mixed with weight ``lam``; their mass is 1 per example.
  """
  keys = tf.random.experimental.stateless_split(seed, 5)
  images = batch["image"]
  height, width = tf.shape(images)[1], tf.shape(images)[2]

  def beta(key, alpha):
    k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    a = tf.random.stateless_gamma([], k1, alpha)
    b = tf.random.stateless_gamma([], k2, alpha)
    return a / (a + b)

  use_cutmix = tf.constant(cutmix_alpha > 0)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], keys[0]) < switch_prob
  apply = tf.random.stateless_uniform([], keys[1]) < prob
  lam = tf.cond(use_cutmix, lambda: beta(keys[2], max(cutmix_alpha, 1e-6)),
                lambda: beta(keys[2], max(mixup_alpha, 1e-6)))
  flipped = tf.reverse(images, axis=[0])
  # Cutmix box: side ratio sqrt(1 - lam), centre uniform, clipped to the image.
  ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
  cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
  cy = tf.random.stateless_uniform([], keys[3], 0, height, tf.int32)
  cx = tf.random.stateless_uniform([], keys[4], 0, width, tf.int32)
  y1, y2 = tf.clip_by_value(cy - cut_h // 2, 0, height), tf.clip_by_value(cy + cut_h // 2, 0, height)
  x1, x2 = tf.clip_by_value(cx - cut_w // 2, 0, width), tf.clip_by_value(cx + cut_w // 2, 0, width)
  rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
  box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  box_lam = 1.0 - tf.cast((y2 - y1) * (x2 - x1), tf.float32) / tf.cast(height * width,
                                                                        tf.float32)
  cut_images = tf.where(box[None, :, :, None], flipped, images)
  mix_images = images * lam + flipped * (1.0 - lam)
  lam = tf.where(apply, tf.where(use_cutmix, box_lam, lam), 1.0)
  mixed = tf.where(apply, tf.where(use_cutmix, cut_images, mix_images), images)
  off = label_smoothing / num_classes
  on = 1.0 - label_smoothing + off
  onehot = tf.one_hot(batch["label"], num_classes, on_value=on, off_value=off)
  soft = onehot * lam + tf.reverse(onehot, axis=[0]) * (1.0 - lam)
  return {**batch, "image": mixed, "label_soft": soft}


class ImageNetSource:
  """The ``imagenet2012`` data source; see the module docstring."""
  num_classes = 1000

  def __init__(self, config):
    self.config = config
    if config.get("randaugment"):
      randaugment_lib.parse(config.randaugment)  # fail early on a bad spec
    tfds = optional.require("tensorflow_datasets")
    self.tfds = tfds
    self.builder = tfds.builder("imagenet2012", data_dir=config.data_dir)
    if not self._prepared():
      manual_dir = config.manual_dir
      missing = [f for f in EXPECTED_FILES
                 if not manual_dir or not os.path.exists(os.path.join(manual_dir, f))]
      if missing:
        raise MissingInputError(
            f"imagenet2012 is not prepared in data.data_dir={config.data_dir!r} and "
            f"data.manual_dir={manual_dir!r} lacks {', '.join(missing)}: download "
            f"{' and '.join(EXPECTED_FILES)} from image-net.org into one folder and pass it "
            "as --config.data.manual_dir.")
      self.builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    splits = self.builder.info.splits
    self.train_size = splits["train"].num_examples
    self.eval_size = splits["validation"].num_examples
    size = config.image_size
    self.image_shape = (size, size, 3)

  def _prepared(self) -> bool:
    try:
      return bool(self.builder.info.splits) and "train" in self.builder.info.splits
    except Exception:  # pylint: disable=broad-except
      return False

  def _normalize(self, tf, image):
    mean = tf.constant(self.config.mean, tf.float32) * 255.0
    std = tf.constant(self.config.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std

  def train_batches(self, *, global_batch: int, start_step: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    tf = _tf()
    cfg = self.config
    local = global_batch // process_count
    split = self.tfds.split_for_jax_process("train", process_index=process_index,
                                            process_count=process_count, drop_remainder=True)
    ds = self.builder.as_dataset(
        split=split, shuffle_files=True, decoders={"image": self.tfds.decode.SkipDecoding()},
        read_config=self.tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.repeat().shuffle(16 * local, seed=seed, reshuffle_each_iteration=True)
    repeats = cfg.get("repeated_aug", 0)
    if repeats and repeats > 1:
      # timm's RepeatAugSampler: each image `repeats` times in a row (so within one global
      # batch), each copy augmented independently; epochs keep their length.
      ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats))
    size = cfg.image_size

    def preprocess(index, example):
      key = tf.stack([tf.cast(seed, tf.int64), index])
      keys = tf.random.experimental.stateless_split(key, 5)
      shape = tf.image.extract_jpeg_shape(example["image"])
      y, x, h, w = random_crop_window(tf, shape, keys[0], tuple(cfg.crop_scale),
                                      tuple(cfg.crop_ratio))
      crop = tf.image.decode_and_crop_jpeg(example["image"], tf.stack([y, x, h, w]),
                                           channels=3)
      bicubic = tf.random.stateless_uniform([], keys[1]) < 0.5
      if cfg.interpolation != "random":
        bicubic = tf.constant(cfg.interpolation == "bicubic")
      crop = tf.cast(crop, tf.float32)
      image = tf.cond(bicubic,
                      lambda: tf.image.resize(crop, [size, size], "bicubic"),
                      lambda: tf.image.resize(crop, [size, size], "bilinear"))
      image = tf.clip_by_value(image, 0.0, 255.0)
      flip = tf.random.stateless_uniform([], keys[2]) < cfg.hflip
      image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
      if cfg.get("randaugment"):
        image = randaugment_lib.randaugment(tf, image, keys[4], cfg.randaugment)
      image = self._normalize(tf, image)
      if cfg.get("random_erasing", 0):
        image = random_erasing(tf, image, keys[3], cfg.random_erasing)
      return {"image": image, "label": tf.cast(example["label"], tf.int32)}

    ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
    if cfg.get("mixup", 0) or cfg.get("cutmix", 0):
      ds = ds.enumerate().map(
          lambda index, batch: mixup_cutmix(
              tf, batch, tf.stack([tf.cast(seed, tf.int64), -1 - index]),
              num_classes=self.num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
              switch_prob=cfg.get("mixup_switch_prob", 0.5), prob=cfg.get("mixup_prob", 1.0),
              label_smoothing=cfg.get("label_smoothing", 0.1)))
    ds = ds.skip(start_step).prefetch(tf.data.AUTOTUNE)
    for batch in ds.as_numpy_iterator():
      yield batch

  def eval_batches(self, *, global_batch: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
    tf = _tf()
    cfg = self.config
    local = global_batch // process_count
    split = self.tfds.split_for_jax_process("validation", process_index=process_index,
                                            process_count=process_count)
    ds = self.builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": self.tfds.decode.SkipDecoding()})
    size, resize = cfg.image_size, cfg.eval_resize

    def preprocess(example):
      image = tf.image.decode_jpeg(example["image"], channels=3)
      image = eval_resize_and_crop(tf, image, resize, size)
      return {"image": self._normalize(tf, image), "label": tf.cast(example["label"], tf.int32),
              "mask": tf.constant(1.0)}

    # Every host runs the same number of batches; padding rows have mask 0.
    per_host = math.ceil(self.eval_size / process_count)
    batches = math.ceil(per_host / local)
    pad = {"image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32),
           "mask": tf.constant(0.0)}
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    for batch in ds.batch(local).take(batches).as_numpy_iterator():
      yield batch


def eval_resize_and_crop(tf, image, resize: int, size: int):
  """Resize the shorter side to ``resize`` (bicubic), then centre-crop ``size``."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(tf.cast(image, tf.float32), new, "bicubic")
  top = (new[0] - size) // 2
  left = (new[1] - size) // 2
  image = tf.clip_by_value(image[top:top + size, left:left + size], 0.0, 255.0)
  return tf.ensure_shape(image, [size, size, 3])
