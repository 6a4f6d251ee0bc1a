"""AdamW with the reference's weight-decay grouping and per-epoch cosine schedule (spec 5.1).

The schedule is timm 0.5.4's ``CosineLRScheduler`` stepped once per epoch, with
``warmup_prefix=False``: the warmup epochs are *not* subtracted from the cosine's
epoch, and every epoch at or past ``epochs`` (the cooldown) runs at ``min_lr``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ofq_jax.interop.names import torch_key
from ofq_jax.paths import dotted, state_path

def lr_at_epoch(epoch, *, base_lr: float, epochs: int, warmup_epochs: int = 0,
                warmup_lr: float = 1e-6, min_lr: float = 1e-5):
  """LR of integer ``epoch`` (numpy or jnp scalar, or Python int).

  ``warmup_lr + e * (base_lr - warmup_lr) / warmup_epochs`` for ``e < warmup_epochs``;
  then ``min_lr + 0.5 (base_lr - min_lr)(1 + cos(pi e / epochs))`` for ``e < epochs``;
  ``min_lr`` afterwards (cooldown and the CGA stage).
  """
  xp = jnp if isinstance(epoch, jax.Array) else np
  e = xp.asarray(epoch, dtype=xp.float32)
  cosine = min_lr + 0.5 * (base_lr - min_lr) * (1 + xp.cos(math.pi * e / max(epochs, 1)))
  lr = xp.where(e < epochs, cosine, min_lr)
  if warmup_epochs > 0:
    warm = warmup_lr + e * (base_lr - warmup_lr) / warmup_epochs
    lr = xp.where(e < warmup_epochs, warm, lr)
  return lr


def epoch_schedule(steps_per_epoch: int, *, first_epoch: int = 0, **kwargs) -> optax.Schedule:
  """Optax schedule: ``lr_at_epoch(first_epoch + step // steps_per_epoch)``."""
  def schedule(step):
    epoch = first_epoch + jnp.asarray(step) // steps_per_epoch
    return lr_at_epoch(epoch, **kwargs)
  return schedule


def weight_decay_mask(state: nnx.State, no_decay: tuple[str, ...] = ()) -> nnx.State:
  """True where timm 0.5.4's ``add_weight_decay`` would decay (spec 5.1).

  Not decayed: every parameter whose *reference* tensor is at most 1-D (biases,
  LayerNorms, LSQ steps, move biases — judged in the reference layout, so the
  per-(token, head) QKR step stored 2-D here is still excluded), names ending
  in ``bias`` and the dotted paths ``no_decay`` (the family's, ``Family.no_decay``:
  DeiT's ``pos_embed``, ``cls_token``, ``dist_token``).
  """
  def decays(path, leaf) -> bool:
    _, kind = torch_key(path)
    ndim = 1 if kind == "flatten" else np.ndim(leaf)
    name = str(path[-1])
    return ndim > 1 and not name.endswith("bias") and dotted(path) not in no_decay
  return jax.tree.map_with_path(lambda p, x: decays(state_path(p), x), state)


SHARED, OWN = "shared", "own"
"""``adamw``'s two groups when some parameters have a step count of their own."""


def adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float, mask,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          grad_clip_norm: float = 0.0, own_count=None) -> optax.GradientTransformation:
  """torch.optim.AdamW (decoupled decay, bias correction) with optional global-norm clip.

  ``own_count`` (a pytree of bools like the parameters, or None): those parameters get an
  AdamW of their own (``optax.partition``), with their own moments and step count, so
  moments that start at zero in the middle of a run are bias-corrected from their own
  first step, as in torch, where Adam counts steps per parameter (``cga.include_qk``'s
  W_qk). The clip stays global; the hyper-parameters are the same for both groups.
  """
  parts = []
  if grad_clip_norm and grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  make = lambda: optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=mask)
  if own_count is None:
    parts.append(make())
  else:
    labels = jax.tree.map(lambda own: OWN if own else SHARED, own_count)
    parts.append(optax.partition({SHARED: make(), OWN: make()}, labels))
  return optax.chain(*parts)

