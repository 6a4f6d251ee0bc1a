"""Losses of the three stages (spec 5.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
