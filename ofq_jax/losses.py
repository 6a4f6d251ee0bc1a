"""Losses of the three stages (spec 5.1), over the model's train-mode ``Logits``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ofq_jax.errors import UserError


def cross_entropy(logits: jax.Array, labels: jax.Array, *, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean CE against integer labels (optionally smoothed one-hot targets)."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def classification_loss(logits: jax.Array, labels: jax.Array, *, num_classes: int,
                        label_smoothing: float = 0.0,
                        soft_targets: jax.Array | None = None) -> jax.Array:
  """Hard-label CE, or CE against ``soft_targets`` (mixup / cutmix, already smoothed)."""
  if soft_targets is not None:
    return jnp.mean(optax.softmax_cross_entropy(logits, soft_targets))
  return cross_entropy(logits, labels, num_classes=num_classes,
                       label_smoothing=label_smoothing)


def soft_cross_entropy(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Mean CE of ``logits`` against ``softmax(teacher_logits)`` at T = 1, teacher detached.

  The reference calls it KL (``KLLossSoft``); it differs from KL by the teacher's
  entropy, which has no gradient.
  """
  targets = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def kd_loss(cls_logits: jax.Array, dist_logits: jax.Array, teacher_logits: jax.Array,
            labels: jax.Array, *, num_classes: int, label_smoothing: float = 0.0,
            soft_targets: jax.Array | None = None) -> jax.Array:
  """The reference's ``KDLossSoftandHard``: soft CE on the dist head + hard CE on the cls
  head (against the mixed targets when mixup / cutmix is on), equal weights."""
  return (soft_cross_entropy(dist_logits, teacher_logits) +
          classification_loss(cls_logits, labels, num_classes=num_classes,
                              label_smoothing=label_smoothing, soft_targets=soft_targets))


TEACHER_LOGITS = ("cls", "avg")


def _targets(batch: dict[str, Any], num_classes: int, label_smoothing: float) -> dict:
  return dict(num_classes=num_classes, label_smoothing=label_smoothing,
              soft_targets=batch.get("label_soft"))  # mixup / cutmix targets


def heads(out) -> tuple[jax.Array, jax.Array]:
  """``(cls, dist)`` of a train-mode output: DeiT's ``Logits``, or a single-head model's
  logits (Swin) as both, so that KD is soft CE + hard CE on the same logits (SWIN.md 8.3)."""
  if isinstance(out, jax.Array):
    return out, out
  return out.cls, out.dist


def float_loss(out, batch: dict[str, Any], *, num_classes: int,
               label_smoothing: float = 0.0) -> jax.Array:
  """The float stage: CE on both heads, averaged (``out`` is the model's ``Logits``)."""
  targets = _targets(batch, num_classes, label_smoothing)
  ce = lambda logits: classification_loss(logits, batch["label"], **targets)
  cls, dist = heads(out)
  return 0.5 * (ce(cls) + ce(dist))


def distill_loss(out, batch: dict[str, Any], teacher, *, teacher_logits: str = "cls",
                 num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """QAT and CGA: ``kd_loss`` against the teacher's cls head (the reference, item 7.4)
  or, with ``teacher_logits='avg'``, the mean of its two heads."""
  teacher_cls, teacher_dist = heads(teacher)
  soft = teacher_cls if teacher_logits == "cls" else (teacher_cls + teacher_dist) / 2
  cls, dist = heads(out)
  return kd_loss(cls, dist, jax.lax.stop_gradient(soft), batch["label"],
                 **_targets(batch, num_classes, label_smoothing))


def stage_loss(*, distill: bool, num_classes: int, label_smoothing: float = 0.0,
               teacher_logits: str = "cls") -> Callable[..., jax.Array]:
  """The loss of a stage with its options bound: ``float_loss`` or, with a teacher,
  ``distill_loss`` (``teacher_logits`` checked here, before any work starts)."""
  options = dict(num_classes=num_classes, label_smoothing=label_smoothing)
  if not distill:
    return functools.partial(float_loss, **options)
  if teacher_logits not in TEACHER_LOGITS:
    raise UserError(f"kd.teacher_logits={teacher_logits!r} is not one of {TEACHER_LOGITS}; "
                     "'cls' is the reference (its teacher's cls head), 'avg' both heads.")
  return functools.partial(distill_loss, teacher_logits=teacher_logits, **options)
