"""Input pipelines behind one small interface (``DataSource``), chosen by name."""

from __future__ import annotations

import dataclasses
from typing import Protocol
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from ofq_jax.errors import UserError

Batch = dict[str, np.ndarray]


class DataSource(Protocol):
  """What the training loop needs from a dataset.

  Batches are host-local numpy dicts (``image`` NHWC float32, ``label`` int32;
  eval batches also ``mask``, 1 for real examples) holding this process's
  share of the global batch; ``train_batches(start_step=k)`` must yield the
  same batches an uninterrupted run yields from step ``k`` on.
  """
  num_classes: int
  image_shape: tuple[int, int, int]
  train_size: int
  eval_size: int

  def train_batches(self, *, global_batch: int, start_step: int, seed: int,
                    process_index: int, process_count: int) -> Iterator[Batch]: ...

  def eval_batches(self, *, global_batch: int, process_index: int,
                   process_count: int) -> Iterator[Batch]: ...


def build(config: ml_collections.ConfigDict) -> DataSource:
  """The data source named by ``config.name``."""
  if config.name == "digits":
    from ofq_jax.data.digits import DigitsSource  # pylint: disable=import-outside-toplevel
    return DigitsSource(image_size=config.image_size, augment=config.get("augment", "shift"))
  if config.name == "imagenet2012":
    from ofq_jax.data.imagenet import ImageNetSource  # pylint: disable=import-outside-toplevel
    return ImageNetSource(config)
  raise UserError(f"Unknown dataset {config.name!r}; available: 'digits', 'imagenet2012'.")


def steps_per_epoch(source: DataSource, global_batch: int) -> int:
  """Full batches per epoch (the reference drops the last partial batch)."""
  steps = source.train_size // global_batch
  if steps < 1:
    raise UserError(f"batch_size={global_batch} is larger than the {source.train_size} "
                     "training examples.")
  return steps


IMAGENET_SPLITS = {"train": 1_281_167, "validation": 50_000}
"""imagenet2012's split sizes (TFDS), for plans made without the data."""


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What a plan (``ofq_jax.plan``) needs of a data set, read without touching it: the
  sizes that set the steps per epoch, and what a training batch holds."""
  num_classes: int
  image_shape: tuple[int, int, int]
  train_size: int
  eval_size: int
  soft_labels: bool = False  # mixup / cutmix batches carry ``label_soft``

  def train_batch(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one global training batch (``DataSource`` docstring)."""
    batch = {"image": jax.ShapeDtypeStruct((global_batch,) + self.image_shape, np.float32),
             "label": jax.ShapeDtypeStruct((global_batch,), np.int32)}
    if self.soft_labels:
      batch["label_soft"] = jax.ShapeDtypeStruct((global_batch, self.num_classes),
                                                 np.float32)
    return batch


def describe(config: ml_collections.ConfigDict) -> DataShape:
  """``config``'s data set as a ``DataShape``; ImageNet's sizes are its known split sizes,
  so no TFDS directory is needed."""
  if config.name == "imagenet2012":
    size = config.image_size
    return DataShape(1000, (size, size, 3), IMAGENET_SPLITS["train"],
                     IMAGENET_SPLITS["validation"],
                     soft_labels=bool(config.get("mixup", 0) or config.get("cutmix", 0)))
  source = build(config)
  return DataShape(source.num_classes, tuple(source.image_shape), source.train_size,
                   source.eval_size)
