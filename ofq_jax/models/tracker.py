"""Oscillation tracking of a quantized model's weights, for the train step (spec 4.5).

``OscillationTracker(model)`` follows every tensor the model rounds (StatsQ or LSQ
kernels, QKR's value kernel, and QKR's quantized ``W_q^T W_k`` product, which is what
QKR actually rounds) and keeps, per tensor, the ``ofq_jax.quant.oscillation`` state in
typed ``OscillationVar`` variables, under two flip definitions side by side: the
integer level under the current scale, and the level on a grid frozen every
``grid_every_steps`` steps (``ofq_jax.quant.oscillation`` explains both). For QKR it
also follows the *implied* levels of ``W_q`` and ``W_k`` (what StatsQ would round them
to), which the model never rounds, so that "QKR reduces q/k oscillation" can be read
like for like; they are reported in their own group and left out of the totals.

Tensors are reported per module type (``models.family.KINDS``: ``qk``, ``v``, ``proj``, ``fc1``,
``fc2``, ``reduction``, ``patch_embed``, ``head``), as the model's family declares them
(``Family.kinds``): a standard attention's fused qkv kernel is split into its q, k and v
columns, and QKR's product into its heads.

The tracker is a module of its own, beside the model, so the model's parameters,
checkpoint layout and interop stay as they are; its state has the shapes of the
weights it follows, so the fsdp rule shards it like them. Per-part numbers are computed
at log steps only, as a few stacked vectors (``layer_metrics``), and named on the host
(``named_metrics``); the train step itself carries just the update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.errors import UserError
from ofq_jax.models import family_of, rounded
from ofq_jax.models.family import FUSED_QKV, IMPLIED, Family
from ofq_jax.paths import dotted
from ofq_jax.quant.oscillation import (FixedGridState, OscillationState, init_fixed_grid,
                                       init_oscillation, oscillation_step, track_fixed_grid)
from ofq_jax.quant.rounding import Rounding

DEFINITIONS = {"osc": "integer level", "osc_grid": "fixed grid"}
"""Metric prefix of each flip definition."""


def tracking_config(**overrides: Any) -> ml_collections.ConfigDict:
  """``config.tracking`` of a training config (defaults: spec 4.5 / Nagel et al.)."""
  config = ml_collections.ConfigDict(dict(
      enabled=True,
      every_steps=1,  # tracked step interval: levels are compared k steps apart
      momentum=0.01,  # EMA momentum of oscillation events
      threshold=0.005,  # a weight whose EMA exceeds this is oscillating
      fixed_grid=True,  # also track flips on a grid frozen between refreshes
      grid_every_steps=100,  # the fixed grid's refresh interval (a multiple of every_steps)
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


def implied_weights(model: nnx.Module) -> tuple[rounded.RoundedTensor, ...]:
  """QKR's factors ``W_q``, ``W_k`` as StatsQ at the product's bits would round them
  (per output unit, like a Dense kernel); empty for models without QKR factors."""
  found = []
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, rounded.RoundsTensors):
      continue
    for r in module.rounds():
      for source in r.sources:
        if getattr(module, source, None) is None:
          continue
        name = dotted(tuple(path) + (source,))
        found.append(rounded.RoundedTensor(name, tuple(path), source,
                                           Rounding("statsq", r.rounding.bits, (0,)), name))
  return tuple(found)


def _value_and_step(module: nnx.Module, weight: rounded.RoundedTensor
                    ) -> tuple[jax.Array, jax.Array | None]:
  """The tensor before rounding and its LSQ step (None for StatsQ and implied factors)."""
  if weight.attr in {r.name for r in module.rounds()}:
    return module.value(weight.attr), module.step(module.declaration(weight.attr))
  return getattr(module, weight.attr)[...], None


def weight_levels(module: nnx.Module, weight: rounded.RoundedTensor) -> jax.Array:
  """Integer level of every entry, as the forward pass rounds it."""
  return weight.rounding.levels(*_value_and_step(module, weight))


def weight_scale(module: nnx.Module, weight: rounded.RoundedTensor) -> jax.Array:
  """Per-output-channel scale, flattened: StatsQ's ``2 mean|w|`` or LSQ's learned step."""
  return weight.rounding.scale(*_value_and_step(module, weight))


def _modules(model: nnx.Module) -> dict[tuple[str | int, ...], nnx.Module]:
  return {tuple(path): module for path, module in nnx.iter_modules(model)}


def weight_scales(model: nnx.Module) -> dict[str, jax.Array]:
  """Name -> per-channel scale vector of every quantized weight (for plots)."""
  modules = _modules(model)
  return {w.name: weight_scale(modules[w.path], w) for w in quantized_weights(model)}


# ----------------------------------------------------------------------------- groups
@dataclasses.dataclass(frozen=True)
class Part:
  """A reported piece of a tracked tensor: its group, a label ('' = the whole tensor)
  and the index of its entries."""
  group: str
  label: str
  index: tuple[Any, ...]


def tensor_parts(weight: rounded.RoundedTensor, shape: tuple[int, ...], family: Family, *,
                 implied: bool = False) -> tuple[Part, ...]:
  """How a tensor is reported, by its kind in ``family`` (``Family.kind``): a fused
  ``(in, 3D)`` qkv kernel as its q, k (group ``qk``) and v columns; QKR's ``(H, D, D)``
  product per head; the rest whole."""
  if implied:
    return (Part(IMPLIED, "", ()),)
  kind = family.kind(weight.name)
  if kind == FUSED_QKV:
    width = shape[-1] // 3
    return tuple(Part(group, label, (Ellipsis, slice(i * width, (i + 1) * width)))
                 for i, (group, label) in enumerate((("qk", "q"), ("qk", "k"), ("v", "v"))))
  if weight.attr == "qk_product":
    return tuple(Part("qk", f"head{h}", (h,)) for h in range(shape[0]))
  return (Part(kind, "", ()),)


# ----------------------------------------------------------------------------- state
class WeightTracker(nnx.Module):
  """The tracker state of one weight tensor, under both flip definitions."""

  def __init__(self, shape: tuple[int, ...], scale_size: int, parts: int, fixed_grid: bool):
    self.prev_level = OscillationVar(jnp.zeros(shape, jnp.int8))
    self.prev_direction = OscillationVar(jnp.zeros(shape, jnp.int8))
    self.ema = OscillationVar(jnp.zeros(shape, jnp.float32))
    # Weights whose level changed at the last tracked step, per part and step.
    self.flips = OscillationVar(jnp.zeros((parts,), jnp.float32))
    if fixed_grid:
      self.grid_scale = OscillationVar(jnp.zeros((scale_size,), jnp.float32))
      self.grid_prev_level = OscillationVar(jnp.zeros(shape, jnp.int8))
      self.grid_prev_direction = OscillationVar(jnp.zeros(shape, jnp.int8))
      self.grid_ema = OscillationVar(jnp.zeros(shape, jnp.float32))
      self.grid_flips = OscillationVar(jnp.zeros((parts,), jnp.float32))
    else:
      self.grid_scale = None

  def state(self) -> OscillationState:
    return OscillationState(self.prev_level[...], self.prev_direction[...], self.ema[...])

  def grid_state(self) -> FixedGridState:
    return FixedGridState(self.grid_scale[...], OscillationState(
        self.grid_prev_level[...], self.grid_prev_direction[...], self.grid_ema[...]))

  def set(self, state: OscillationState, flips: jax.Array) -> None:
    # Whole-value set_value, not ``var[...] = x``: the indexed form compares shardings,
    # which under jit walks the traced program once per write (minutes for DeiT-T's
    # 250 writes at the end of a train step).
    self.prev_level.set_value(state.prev_level)
    self.prev_direction.set_value(state.prev_direction)
    self.ema.set_value(state.ema)
    self.flips.set_value(jnp.asarray(flips, jnp.float32))

  def set_grid(self, state: FixedGridState, flips: jax.Array) -> None:
    self.grid_scale.set_value(state.grid_scale)
    self.grid_prev_level.set_value(state.oscillation.prev_level)
    self.grid_prev_direction.set_value(state.oscillation.prev_direction)
    self.grid_ema.set_value(state.oscillation.ema)
    self.grid_flips.set_value(jnp.asarray(flips, jnp.float32))


def _level_and_scale_shapes(model: nnx.Module, followed: tuple[rounded.RoundedTensor, ...]
                            ) -> tuple[list[tuple[int, ...]], list[int]]:
  """Each followed tensor's level shape and scale count, from shapes alone: ``model``
  may hold values or be abstract (``nnx.eval_shape``, a plan's model)."""
  graphdef, state = nnx.split(model)

  def shapes(state):
    modules = _modules(nnx.merge(graphdef, state))
    return [(weight_levels(modules[w.path], w), weight_scale(modules[w.path], w))
            for w in followed]
  found = jax.eval_shape(shapes, state)
  return [levels.shape for levels, _ in found], [scale.shape[0] for _, scale in found]


def _part_sums(mask: jax.Array, parts: tuple[Part, ...]) -> jax.Array:
  """Count of True entries of ``mask`` in each part."""
  return jnp.stack([jnp.sum(mask[p.index].astype(jnp.float32)) for p in parts])


class OscillationTracker(nnx.Module):
  """Flip / oscillation tracking of every quantized weight of a model.

  Args:
    model: the quantized model (only its structure and shapes are read here).
    momentum, threshold: the EMA momentum and the oscillating threshold.
    every_steps: the tracked step interval ``k``; flips are divided by it.
    fixed_grid: also track the fixed-grid definition, its grid refreshed every
      ``grid_every_steps`` steps (a multiple of ``every_steps``).
  """

  def __init__(self, model: nnx.Module, *, momentum: float = 0.01, threshold: float = 0.005,
               every_steps: int = 1, fixed_grid: bool = True, grid_every_steps: int = 100):
    if every_steps < 1:
      raise UserError(f"tracking.every_steps={every_steps} must be >= 1.")
    if not 0.0 < momentum <= 1.0:
      raise UserError(f"tracking.momentum={momentum} must be in (0, 1].")
    if fixed_grid and (grid_every_steps < every_steps or grid_every_steps % every_steps):
      raise UserError(f"tracking.grid_every_steps={grid_every_steps} must be a positive "
                      f"multiple of tracking.every_steps={every_steps} (the grid refreshes "
                      "at a tracked step).")
    self.weights = quantized_weights(model)
    self.implied = implied_weights(model)
    self.momentum = float(momentum)
    self.threshold = float(threshold)
    self.every_steps = int(every_steps)
    self.fixed_grid = bool(fixed_grid)
    self.grid_every_updates = max(1, int(grid_every_steps) // self.every_steps)
    shapes, scale_sizes = _level_and_scale_shapes(model, self.followed)
    family = family_of(model.config)
    self.parts = tuple(tensor_parts(w, shape, family, implied=i >= len(self.weights))
                       for i, (w, shape) in enumerate(zip(self.followed, shapes)))
    self.trackers = nnx.List([WeightTracker(shape, size, len(parts), self.fixed_grid)
                              for shape, size, parts in zip(shapes, scale_sizes, self.parts)])
    self.updates = OscillationVar(jnp.zeros((), jnp.int32))

  @property
  def followed(self) -> tuple[rounded.RoundedTensor, ...]:
    """The rounded tensors, then the implied factors."""
    return self.weights + self.implied

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(w.name for w in self.weights)

  def reset(self, model: nnx.Module) -> None:
    """Starts tracking at ``model``'s current levels (grid: its current scales), with no
    history."""
    modules = _modules(model)
    for weight, tracker in zip(self.followed, self.trackers):
      value, step = _value_and_step(modules[weight.path], weight)  # read once per tensor
      tracker.set(init_oscillation(weight.rounding.levels(value, step)),
                  jnp.zeros(tracker.flips.shape))
      if self.fixed_grid:
        tracker.set_grid(init_fixed_grid(value, weight.rounding.scale(value, step),
                                         weight.rounding.levels_on_grid),
                         jnp.zeros(tracker.flips.shape))
    self.updates.set_value(jnp.zeros((), jnp.int32))

  def update(self, model: nnx.Module) -> None:
    """One tracked step against ``model``'s current levels."""
    modules = _modules(model)
    updates = self.updates[...] + 1
    refresh = updates % self.grid_every_updates == 0
    for weight, tracker, parts in zip(self.followed, self.trackers, self.parts):
      value, step = _value_and_step(modules[weight.path], weight)  # read once per tensor
      state, flipped, _ = oscillation_step(tracker.state(), weight.rounding.levels(value, step),
                                           momentum=self.momentum)
      tracker.set(state, _part_sums(flipped, parts) / self.every_steps)
      if self.fixed_grid:
        grid, flipped, _ = track_fixed_grid(
            tracker.grid_state(), value, weight.rounding.scale(value, step),
            weight.rounding.levels_on_grid, refresh=refresh, momentum=self.momentum)
        tracker.set_grid(grid, _part_sums(flipped, parts) / self.every_steps)
    self.updates.set_value(updates)

  def layer_metrics(self, model: nnx.Module) -> dict[str, jax.Array]:
    """Per-part numbers stacked in tensor order (named by ``named_metrics``)."""
    modules = _modules(model)
    scales = [weight_scale(modules[w.path], w) for w in self.weights]
    both = (("", "ema", "flips"),) + ((("grid_", "grid_ema", "grid_flips"),)
                                      if self.fixed_grid else ())
    out = {}
    for prefix, ema, flips in both:
      out[f"tracking/{prefix}oscillating"] = jnp.concatenate(
          [_part_sums(getattr(t, ema)[...] > self.threshold, parts)
           for t, parts in zip(self.trackers, self.parts)])
      out[f"tracking/{prefix}flips"] = jnp.concatenate(
          [getattr(t, flips)[...] for t in self.trackers])
    out["tracking/scale"] = jnp.stack(
        [jnp.stack([jnp.mean(s), jnp.min(s), jnp.max(s)]) for s in scales])
    return out

  def channel_oscillating(self) -> dict[str, jax.Array]:
    """Name -> oscillating weights per output channel (integer-level definition), in
    the order of ``weight_scale``: which channels' scale trajectories to plot."""
    out = {}
    for weight, tracker in zip(self.weights, self.trackers):
      oscillating = (tracker.ema[...] > self.threshold).astype(jnp.float32)
      axes = tuple(a % oscillating.ndim for a in weight.rounding.reduce_axes)
      out[weight.name] = jnp.reshape(jnp.sum(oscillating, axis=axes), (-1,))
    return out

  def part_sizes(self) -> np.ndarray:
    """Entries per part, in ``layer_metrics`` order."""
    sizes = []
    for tracker, parts in zip(self.trackers, self.parts):
      shape = tracker.ema.shape
      for part in parts:
        sizes.append(np.zeros(shape, np.bool_)[part.index].size)
    return np.array(sizes, np.float64)

  def sizes(self) -> np.ndarray:
    """Entries per rounded tensor."""
    return np.array([int(np.prod(t.ema.shape)) for t in self.trackers[:len(self.weights)]],
                    np.float64)

  def named_metrics(self, stacked: dict[str, Any]) -> dict[str, float]:
    """``layer_metrics`` output (host values) -> named scalars.

    Per definition (``osc``: integer level; ``osc_grid``: fixed grid):
    ``<def>/oscillating_fraction`` (share of the rounded weights whose EMA exceeds the
    threshold; ``..._w<b>`` over the b-bit tensors only), ``<def>/flips`` (weights that
    changed level per step, at the last tracked step), and the same per tensor
    (``<def>/oscillating_fraction/<tensor>``), per part (``.../<tensor>/<q|k|v|headH>``)
    and per module type (``.../group/<group>``; ``qk_implied``: QKR's implied factors,
    not in any total). ``scale/{mean,min,max}/<tensor>``: the per-channel scales.
    """
    sizes = self.part_sizes()
    tensor_of = np.concatenate([np.full(len(p), i) for i, p in enumerate(self.parts)])
    rounded_part = tensor_of < len(self.weights)
    bits = np.array([w.bits for w in self.followed])[tensor_of]
    followed_names = [w.name for w in self.followed]
    out = {}
    for prefix, key in (("osc", ""), ("osc_grid", "grid_")):
      if f"tracking/{key}oscillating" not in stacked:
        continue
      oscillating = np.asarray(stacked[f"tracking/{key}oscillating"], np.float64)
      flips = np.asarray(stacked[f"tracking/{key}flips"], np.float64)
      fraction = lambda chosen: float(oscillating[chosen].sum() / max(sizes[chosen].sum(), 1))
      out[f"{prefix}/oscillating_fraction"] = fraction(rounded_part)
      out[f"{prefix}/flips"] = float(flips[rounded_part].sum())
      for b in sorted(set(bits[rounded_part].tolist())):  # e.g. 2-bit blocks apart from 8-bit
        out[f"{prefix}/oscillating_fraction_w{b}"] = fraction(rounded_part & (bits == b))
      groups = [p.group for parts in self.parts for p in parts]
      for group in dict.fromkeys(groups):
        chosen = np.array([g == group for g in groups])
        out[f"{prefix}/oscillating_fraction/group/{group}"] = fraction(chosen)
        out[f"{prefix}/flips/group/{group}"] = float(flips[chosen].sum())
      labels = [p.label for parts in self.parts for p in parts]
      for i, name in enumerate(followed_names):
        chosen = tensor_of == i
        out[f"{prefix}/oscillating_fraction/{name}"] = fraction(chosen)
        out[f"{prefix}/flips/{name}"] = float(flips[chosen].sum())
        if chosen.sum() > 1:
          for j in np.flatnonzero(chosen):
            out[f"{prefix}/oscillating_fraction/{name}/{labels[j]}"] = fraction(
                np.arange(len(sizes)) == j)
            out[f"{prefix}/flips/{name}/{labels[j]}"] = float(flips[j])
    scale = np.asarray(stacked["tracking/scale"], np.float64)
    for i, name in enumerate(self.names):
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
      every_steps=config.every_steps, fixed_grid=config.get("fixed_grid", True),
      grid_every_steps=config.get("grid_every_steps", 100)))
  return tracker if tracker.weights else None
