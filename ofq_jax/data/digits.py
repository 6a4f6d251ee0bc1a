"""scikit-learn's bundled 8x8 digits as a tiny image-classification set (no download).

Fixed stratified 80/20 split with seed 0 (1437 train / 360 test). Images are
scaled to [0, 1], resized to ``image_size`` (bilinear), made RGB and normalised
to [-1, 1], so the image quantizer sees signed inputs as with ImageNet. Training
batches are a pure function of (seed, step): an epoch is a seeded permutation,
and the optional augmentation is a seeded random shift of up to 1/8 of the side.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ofq_jax.data import Batch
from ofq_jax.errors import UserError


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  import jax  # pylint: disable=import-outside-toplevel
  out = jax.image.resize(images, (images.shape[0], size, size), "bilinear")
  return np.asarray(out, np.float32)


class DigitsSource:
  """The digits data set; see the module docstring."""
  num_classes = 10

  def __init__(self, image_size: int = 32, augment: str = "shift"):
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel
    if augment not in ("shift", "none"):
      raise UserError(f"data.augment={augment!r}; use 'shift' or 'none'.")
    digits = load_digits()
    images = _resize(digits.images.astype(np.float32) / 16.0, image_size)
    images = np.repeat(images[..., None], 3, axis=-1) * 2.0 - 1.0
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0)
    self.train = (x_train, y_train)
    self.test = (x_test, y_test)
    self.image_shape = (image_size, image_size, 3)
    self.train_size = len(y_train)
    self.eval_size = len(y_test)
    self.augment = augment
    self.shift_pad = max(image_size // 8, 1)

  def _shift(self, images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    size = images.shape[1]
    pad = self.shift_pad
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
    out = np.empty_like(images)
    for i, (dy, dx) in enumerate(offsets):
      out[i] = padded[i, dy:dy + size, dx:dx + size]
    return out

  def train_batches(self, *, global_batch: int, start_step: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    x, y = self.train
    steps_per_epoch = self.train_size // global_batch
    local = global_batch // process_count
    step = start_step
    while True:
      epoch, index = divmod(step, steps_per_epoch)
      order = np.random.default_rng([seed, epoch]).permutation(self.train_size)
      mine = slice(process_index * local, (process_index + 1) * local)
      chosen = order[index * global_batch:(index + 1) * global_batch][mine]
      images = x[chosen]
      if self.augment == "shift":
        # Drawn for the whole global batch, so any process count sees the same shifts.
        offsets = np.random.default_rng([seed, epoch, index]).integers(
            0, 2 * self.shift_pad + 1, size=(global_batch, 2))
        images = self._shift(images, offsets[mine])
      yield {"image": images, "label": y[chosen]}
      step += 1

  def eval_batches(self, *, global_batch: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[Batch]:
    x, y = self.test
    local = global_batch // process_count
    for start in range(0, self.eval_size, global_batch):
      idx = np.arange(start, start + global_batch)[process_index * local:(process_index + 1) * local]
      mask = idx < self.eval_size
      idx = np.where(mask, idx, 0)
      yield {"image": x[idx], "label": y[idx], "mask": mask.astype(np.float32)}
