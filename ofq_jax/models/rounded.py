"""Which tensors a model rounds: each layer's declaration, and one walk over a model.

A quantized layer says what it rounds in ``rounds()`` (a ``Rounds`` per tensor: its
name, its ``Rounding``, the parameter behind it and the LSQ step holder, if any) and
its forward pass rounds through the same declaration (``RoundsTensors.rounded``).
``rounded_tensors(model)`` walks a model once and yields them in module order; the
oscillation tracker, CGA's target discovery and the checkpoint guards all use it.
"""

from __future__ import annotations

import dataclasses
import re

import jax
from flax import nnx

from ofq_jax.paths import dotted
from ofq_jax.quant.rounding import Rounding


@dataclasses.dataclass(frozen=True)
class Rounds:
  """One line of a layer's declaration."""
  name: str  # the tensor: "kernel", "v_kernel", "qk_product"
  rounding: Rounding
  param: str | None  # the trained parameter behind it; None when derived (QKR's product)
  holder: str | None = None  # the LsqQuantizer attribute holding the learned step
  sources: tuple[str, ...] = ()  # the parameters a derived tensor is computed from


class FrozenLevels(nnx.Variable):
  """A rounded tensor's integer form and unit, loaded from a packed integer export
  (``ofq_jax.export``): the layer then uses them instead of rounding a latent weight."""


class RoundsTensors:
  """Mixin of layers that round tensors: ``rounds()``, ``value()`` and ``rounded()``."""

  def rounds(self) -> tuple[Rounds, ...]:
    return ()

  def value(self, name: str) -> jax.Array:
    """The tensor before rounding (a parameter's value unless a layer derives it)."""
    return getattr(self, name)[...]

  def declaration(self, name: str) -> Rounds:
    for r in self.rounds():
      if r.name == name:
        return r
    raise KeyError(f"{type(self).__name__} does not round {name!r}.")

  def step(self, rounds: Rounds) -> jax.Array | None:
    return None if rounds.holder is None else getattr(self, rounds.holder).step[...]

  def freeze(self, name: str, integers: jax.Array, unit: jax.Array) -> None:
    """Fixes ``name`` to ``unit * integers`` (inference from a packed export)."""
    self.declaration(name)  # a declared tensor
    setattr(self, f"frozen_{name}", FrozenLevels(integers))
    setattr(self, f"frozen_{name}_unit", FrozenLevels(unit))

  def _frozen(self, name: str) -> tuple[jax.Array, jax.Array] | None:
    integers = getattr(self, f"frozen_{name}", None)
    if integers is None:
      return None
    return integers[...], getattr(self, f"frozen_{name}_unit")[...]

  def weight_unit(self, name: str) -> jax.Array:
    """``rounded(name) / weight_unit(name)`` is an integer (shaped to broadcast)."""
    frozen = self._frozen(name)
    if frozen is not None:
      return frozen[1]
    r = self.declaration(name)
    return r.rounding.unit(self.value(name), self.step(r))

  def weight_integers(self, name: str) -> jax.Array:
    """``rounded(name) / weight_unit(name)``, the integers, as floats."""
    frozen = self._frozen(name)
    if frozen is not None:
      return frozen[0].astype(frozen[1].dtype)
    r = self.declaration(name)
    return r.rounding.integers(self.value(name), self.step(r))

  def rounded(self, name: str) -> jax.Array:
    """The fake-quantized tensor as declared; an LSQ holder calibrates its step here."""
    frozen = self._frozen(name)
    if frozen is not None:
      return frozen[1] * frozen[0].astype(frozen[1].dtype)
    r = self.declaration(name)
    if r.holder is not None:
      return getattr(self, r.holder)(self.value(name))
    return r.rounding.apply(self.value(name))


@dataclasses.dataclass(frozen=True)
class RoundedTensor:
  """A rounded tensor of a model, found by ``rounded_tensors``."""
  name: str  # "blocks.3.attn.qk_product": metric names, CGA target patterns
  path: tuple[str | int, ...]  # the owning module
  attr: str  # its name inside the module
  rounding: Rounding
  param: str | None  # dotted state path of the parameter behind it, or None

  @property
  def method(self) -> str:
    return self.rounding.method

  @property
  def bits(self) -> int:
    return self.rounding.bits


def rounded_tensors(model: nnx.Module) -> tuple[RoundedTensor, ...]:
  """Every tensor ``model`` rounds, in module order."""
  found = []
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, RoundsTensors):
      continue
    path = tuple(path)
    for r in module.rounds():
      found.append(RoundedTensor(dotted(path + (r.name,)), path, r.name, r.rounding,
                                 r.param and dotted(path + (r.param,))))
  return tuple(found)


def levels(module: RoundsTensors, tensor: RoundedTensor) -> jax.Array:
  """Integer level of every entry of ``tensor`` (``module`` owns it)."""
  r = module.declaration(tensor.attr)
  return r.rounding.levels(module.value(tensor.attr), module.step(r))


def scale(module: RoundsTensors, tensor: RoundedTensor) -> jax.Array:
  """Per-channel scale of ``tensor``, flattened."""
  r = module.declaration(tensor.attr)
  return r.rounding.scale(module.value(tensor.attr), module.step(r))


class CGATarget(int):
  """A CGA target's bit-width, as an ``int`` (``bits`` pytrees of plain ints stay valid),
  that also names the axes its StatsQ scale averages over (``reduce_axes``, as its
  ``Rounding``): ``(0,)`` for a Flax kernel ``(in, out)``, ``(2,)`` for QKR's
  ``(H, D, D)`` product (one scale per (head, row))."""

  reduce_axes: tuple[int, ...]

  def __new__(cls, bits: int, reduce_axes: tuple[int, ...] = (0,)) -> CGATarget:
    target = super().__new__(cls, bits)
    target.reduce_axes = tuple(reduce_axes)
    return target

  def __repr__(self) -> str:
    return f"CGATarget(bits={int(self)}, reduce_axes={self.reduce_axes})"


def cga_targets(model: nnx.Module, pattern: str) -> dict[str, CGATarget]:
  """Dotted param path -> bits (with reduce axes) of each StatsQ weight parameter whose
  rounded tensor's name matches.

  Derived tensors (QKR's ``W_q^T W_k`` in the reference's factors form) have no
  parameter to freeze and are left out; in the product form (``quant.qk_form=
  'product'``) ``qk_product`` is the parameter ``qk_kernel`` and can be a target.
  """
  regex = re.compile(pattern)
  return {t.param: CGATarget(t.bits, t.rounding.reduce_axes) for t in rounded_tensors(model)
          if t.method == "statsq" and t.param is not None and regex.fullmatch(t.name)}
