"""A tiny ImageNet in the layout tfds's ``imagenet2012`` builder reads from ``manual_dir``.

For tests and the input-pipeline benchmark: random JPEGs in per-synset tars inside
``ILSVRC2012_img_train.tar``, and flat ``ILSVRC2012_val_XXXXXXXX.JPEG`` files in
``ILSVRC2012_img_val.tar``.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np

from ofq_jax.data import optional

SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  tf = optional.require("tensorflow", what="writing a fake ImageNet")
  pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(pixels).numpy()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet(manual_dir: str, *, classes: int = 3, per_class: int = 4,
                        val_images: int = 7, size: tuple[int, int] = (40, 48),
                        seed: int = 0) -> str:
  """Writes the two tars into ``manual_dir`` (created) and returns it."""
  if not 1 <= classes <= len(SYNSETS):
    raise ValueError(f"classes={classes}: between 1 and {len(SYNSETS)}.")
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  height, width = size
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for synset in SYNSETS[:classes]:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for i in range(per_class):
          _add(inner, f"{synset}_{i}.JPEG", _jpeg(rng, height + 4 * (i % 4), width))
      _add(outer, f"{synset}.tar", inner_bytes.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for i in range(1, val_images + 1):
      _add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, height + 4, width + 4))
  return manual_dir
