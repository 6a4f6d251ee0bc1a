"""Oscillation tracking of a quantized DeiT's weights, for the train step (spec 4.5).

``OscillationTracker(model)`` finds every quantized weight tensor of ``model``
(StatsQ or LSQ kernels, QKR's value kernel, and QKR's quantized ``W_q^T W_k``
product, which is what QKR actually rounds) and keeps, per tensor, the
``ofq_jax.quant.oscillation`` state in typed ``OscillationVar`` variables. The
tracker is a module of its own, beside the model, so the model's parameters,
checkpoint layout and interop stay as they are; its state has the shapes of the
weights it follows, so the fsdp rule shards it like them.

Per-layer numbers are computed at log steps only, as a few stacked vectors
(``layer_metrics``), and named on the host (``named_metrics``); the train step itself
carries just the update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.errors import UserError
from ofq_jax.models import rounded
from ofq_jax.quant.oscillation import OscillationState, init_oscillation, update_oscillation


def tracking_config(**overrides: Any) -> ml_collections.ConfigDict:
  """``config.tracking`` of a training config (defaults: spec 4.5 / Nagel et al.)."""
  config = ml_collections.ConfigDict(dict(
      enabled=True,
      every_steps=1,  # tracked step interval: levels are compared k steps apart
      momentum=0.01,  # EMA momentum of oscillation events
      threshold=0.005,  # a weight whose EMA exceeds this is oscillating
      scales_every_steps=100,  # full per-channel scale vectors into metrics.jsonl (0: never)
  ))
  config.update(overrides)
  return config


class OscillationVar(nnx.Variable):
  """Oscillation tracker state: not trained, checkpointed, sharded like its weight."""


QuantizedWeight = rounded.RoundedTensor
"""A tensor the forward pass rounds (``ofq_jax.models.rounded``); kept under its old name."""


def quantized_weights(model: nnx.Module) -> tuple[rounded.RoundedTensor, ...]:
  """Every weight tensor ``model`` rounds, in module order (the layers' declarations)."""
  return rounded.rounded_tensors(model)


def weight_levels(module: nnx.Module, weight: rounded.RoundedTensor) -> jax.Array:
  """Integer level of every entry, as the forward pass rounds it."""
  return rounded.levels(module, weight)


def weight_scale(module: nnx.Module, weight: rounded.RoundedTensor) -> jax.Array:
  """Per-output-channel scale, flattened: StatsQ's ``2 mean|w|`` or LSQ's learned step."""
  return rounded.scale(module, weight)


def _modules(model: nnx.Module) -> dict[tuple[str | int, ...], nnx.Module]:
  return {tuple(path): module for path, module in nnx.iter_modules(model)}


def weight_scales(model: nnx.Module) -> dict[str, jax.Array]:
  """Name -> per-channel scale vector of every quantized weight (for plots)."""
  modules = _modules(model)
  return {w.name: weight_scale(modules[w.path], w) for w in quantized_weights(model)}


class WeightTracker(nnx.Module):
  """The tracker state of one weight tensor."""

  def __init__(self, shape: tuple[int, ...]):
    self.prev_level = OscillationVar(jnp.zeros(shape, jnp.int8))
    self.prev_direction = OscillationVar(jnp.zeros(shape, jnp.int8))
    self.ema = OscillationVar(jnp.zeros(shape, jnp.float32))
    # Weights whose level changed at the last tracked step, per step of the interval.
    self.flips = OscillationVar(jnp.zeros((), jnp.float32))

  def state(self) -> OscillationState:
    return OscillationState(self.prev_level[...], self.prev_direction[...], self.ema[...])

  def set(self, state: OscillationState, flips: jax.Array) -> None:
    # Whole-value set_value, not ``var[...] = x``: the indexed form compares shardings,
    # which under jit walks the traced program once per write (minutes for DeiT-T's
    # 250 writes at the end of a train step).
    self.prev_level.set_value(state.prev_level)
    self.prev_direction.set_value(state.prev_direction)
    self.ema.set_value(state.ema)
    self.flips.set_value(jnp.asarray(flips, jnp.float32))


class OscillationTracker(nnx.Module):
  """Flip / oscillation tracking of every quantized weight of a model.

  Args:
    model: the quantized DeiT (only its structure and shapes are read here).
    momentum, threshold: the EMA momentum and the oscillating threshold.
    every_steps: the tracked step interval ``k``; flips are divided by it.
  """

  def __init__(self, model: nnx.Module, *, momentum: float = 0.01, threshold: float = 0.005,
               every_steps: int = 1):
    if every_steps < 1:
      raise UserError(f"tracking.every_steps={every_steps} must be >= 1.")
    if not 0.0 < momentum <= 1.0:
      raise UserError(f"tracking.momentum={momentum} must be in (0, 1].")
    self.weights = quantized_weights(model)
    self.momentum = float(momentum)
    self.threshold = float(threshold)
    self.every_steps = int(every_steps)
    modules = _modules(model)
    shapes = [jax.eval_shape(lambda w=w: weight_levels(modules[w.path], w)).shape
              for w in self.weights]
    self.trackers = nnx.List([WeightTracker(shape) for shape in shapes])

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(w.name for w in self.weights)

  def reset(self, model: nnx.Module) -> None:
    """Starts tracking at ``model``'s current levels, with no history."""
    modules = _modules(model)
    for weight, tracker in zip(self.weights, self.trackers):
      tracker.set(init_oscillation(weight_levels(modules[weight.path], weight)), 0.0)

  def update(self, model: nnx.Module) -> None:
    """One tracked step against ``model``'s current levels."""
    modules = _modules(model)
    for weight, tracker in zip(self.weights, self.trackers):
      levels = weight_levels(modules[weight.path], weight)
      state, stats = update_oscillation(tracker.state(), levels, momentum=self.momentum,
                                        threshold=self.threshold)
      tracker.set(state, stats["flips"] / self.every_steps)

  def layer_metrics(self, model: nnx.Module) -> dict[str, jax.Array]:
    """Per-layer numbers stacked in tensor order (named by ``named_metrics``)."""
    modules = _modules(model)
    scales = [weight_scale(modules[w.path], w) for w in self.weights]
    return {
        "tracking/oscillating": jnp.stack(
            [jnp.sum(t.ema[...] > self.threshold) for t in self.trackers]).astype(jnp.float32),
        "tracking/flips": jnp.stack([t.flips[...] for t in self.trackers]),
        "tracking/scale": jnp.stack(
            [jnp.stack([jnp.mean(s), jnp.min(s), jnp.max(s)]) for s in scales]),
    }

  def sizes(self) -> np.ndarray:
    return np.array([int(np.prod(t.ema.shape)) for t in self.trackers], np.float64)

  def named_metrics(self, stacked: dict[str, Any]) -> dict[str, float]:
    """``layer_metrics`` output (host values) -> named scalars, per layer and in total.

    ``osc/oscillating_fraction[/<tensor>]``: share of weights whose EMA exceeds the
    threshold (``osc/oscillating_fraction_w<b>``: over the b-bit tensors only); ``osc/flips[/<tensor>]``: weights that changed level per step (at the
    last tracked step); ``scale/{mean,min,max}/<tensor>``: the per-channel scales.
    """
    sizes = self.sizes()
    oscillating = np.asarray(stacked["tracking/oscillating"], np.float64)
    flips = np.asarray(stacked["tracking/flips"], np.float64)
    scale = np.asarray(stacked["tracking/scale"], np.float64)
    out = {"osc/oscillating_fraction": float(oscillating.sum() / max(sizes.sum(), 1.0)),
           "osc/flips": float(flips.sum())}
    bits = np.array([w.bits for w in self.weights])
    for b in sorted(set(bits.tolist())):  # e.g. the 2-bit blocks apart from 8-bit heads
      chosen = bits == b
      out[f"osc/oscillating_fraction_w{b}"] = float(oscillating[chosen].sum() /
                                                    sizes[chosen].sum())
    for i, name in enumerate(self.names):
      out[f"osc/oscillating_fraction/{name}"] = float(oscillating[i] / sizes[i])
      out[f"osc/flips/{name}"] = float(flips[i])
      for j, stat in enumerate(("mean", "min", "max")):
        out[f"scale/{stat}/{name}"] = float(scale[i, j])
    return out


def create_tracker(model: nnx.Module, config: ml_collections.ConfigDict | None
                   ) -> OscillationTracker | None:
  """The tracker ``config.tracking`` asks for, or None (disabled, or nothing quantized).

  Its variables hold shapes only (``nnx.eval_shape``): the real state is made by
  ``reset`` inside a jitted function, so no zero-filled copy stays alive beside it.
  """
  if config is None or not config.enabled:
    return None
  tracker = nnx.eval_shape(lambda: OscillationTracker(
      model, momentum=config.momentum, threshold=config.threshold,
      every_steps=config.every_steps))
  return tracker if tracker.weights else None
