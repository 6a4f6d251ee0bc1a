"""Confidence-guided annealing (spec 4) as an optax GradientTransformation.

Each step, for every target weight, the frozen mask is computed from the
current (pre-step) weight with the StatsQ rule of ``cga_frozen_mask``; frozen
gradients are zeroed before the inner optimizer and frozen updates zeroed
after it, so frozen weights stay bit-exact (AdamW's decoupled decay and the
resumed first moment would otherwise still move them, spec 4.3). Masks are
recomputed every step (progressive freezing); the state carries the frozen
fractions of that computation, so the train step reports them without
computing the masks a second time.

Targets are parameters: the reference's are fc1, fc2, proj and v (each family's
``Family.cga_targets``). QKR's ``W_qk = W_q^T W_k`` is never annealed there (spec 4.4,
OFQ issue #6): it is derived from ``W_q``, ``W_k``, so no entry of it can be held while
others train (each factor entry feeds a whole row or column of its head's product).
``cga.include_qk=True`` (off by default: the reference) runs the CGA stage with QKR in
its product form (``model.quant.qk_form='product'``: ``W_qk`` is the parameter
``qk_kernel``, started at the QAT ``W_q^T W_k``) and adds every ``qk_product``
(``QK_TARGETS``) to the targets. Its mask uses the product's own StatsQ scale, one per
(head, row) (``reduce_axes=(2,)``, carried by ``rounded.CGATarget``), with ``lo`` /
``hi`` over the whole tensor, as for every target (spec 4.2).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ofq_jax.paths import dotted, state_path
from ofq_jax.quant.statsq import cga_frozen_mask

QK_TARGETS = r"(.+\.)?qk_product"
"""Every QKR product (the rounding's name, wherever a family puts its attention), added to
the targets by ``cga.include_qk``; it matches a parameter only in the product form
(``rounded.cga_targets``)."""


def stage_targets(cga_config: Any) -> str:
  """The target pattern of a CGA stage: ``cga.targets``, plus ``QK_TARGETS`` when
  ``cga.include_qk`` is on."""
  if not include_qk(cga_config):
    return cga_config.targets
  return f"(?:{cga_config.targets})|(?:{QK_TARGETS})"


def include_qk(cga_config: Any) -> bool:
  """``cga.include_qk`` (configs written before it existed: off, the reference)."""
  return bool(cga_config.get("include_qk", False))


class CGAState(NamedTuple):
  inner: optax.OptState
  frozen: dict[str, jax.Array]  # share frozen per target (dotted path) and "total"


def frozen_masks(params: Any, bits: Any, boundary_range: float) -> Any:
  """Pytree of frozen masks: ``bits`` is a pytree of ints (0 = not a target); a
  ``CGATarget`` names its scale axes, a plain int is a Flax kernel's ``(0,)``."""
  def mask(p, b):
    if not b:
      return jnp.zeros(jnp.shape(p), bool)
    return cga_frozen_mask(p, int(b), boundary_range, getattr(b, "reduce_axes", (0,)))
  return jax.tree.map(mask, params, bits)


def cga(inner: optax.GradientTransformation, bits: Any, boundary_range: float = 0.005
        ) -> optax.GradientTransformation:
  """Wraps ``inner`` so that confidently-quantized target weights are frozen.

  Args:
    inner: the optimizer (AdamW in the reference, at constant min LR).
    bits: a pytree like the params holding each target's StatsQ bit-width (an int
      or a ``rounded.CGATarget``, which also names its scale axes) and 0 for
      non-targets (``target_bits`` builds it from ``rounded.cga_targets``).
    boundary_range: BR, the half-width of the trainable band around each
      rounding threshold in units of the quantization step.
  """
  def init(params):
    return CGAState(inner.init(params), frozen_fractions(params, bits, boundary_range))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("cga needs params in update() to compute its masks.")
    frozen = frozen_masks(params, bits, boundary_range)
    zero_frozen = lambda m, x: jnp.where(m, jnp.zeros_like(x), x)
    grads = jax.tree.map(zero_frozen, frozen, grads)
    updates, inner_state = inner.update(grads, state.inner, params)
    updates = jax.tree.map(zero_frozen, frozen, updates)
    return updates, CGAState(inner_state, _fractions(frozen, bits))

  return optax.GradientTransformation(init, update)


def reported_fractions(opt_state: Any) -> dict[str, jax.Array] | None:
  """The frozen fractions a ``cga`` state (anywhere in ``opt_state``) last computed."""
  found = [s.frozen for s in jax.tree.leaves(opt_state, is_leaf=_is_cga_state)
           if isinstance(s, CGAState)]
  return found[0] if found else None


def _is_cga_state(x: Any) -> bool:
  return isinstance(x, CGAState)


def frozen_fractions(params: Any, bits: Any, boundary_range: float) -> dict[str, jax.Array]:
  """Fraction of frozen entries per target (keyed by dotted path) and in total."""
  return _fractions(frozen_masks(params, bits, boundary_range), bits)


def _fractions(frozen: Any, bits: Any) -> dict[str, jax.Array]:
  out, total, count = {}, 0.0, 0
  for (path, m), b in zip(jax.tree_util.tree_flatten_with_path(frozen)[0],
                          jax.tree.leaves(bits)):
    if not b:
      continue
    name = dotted(state_path(path))
    out[name] = jnp.mean(m.astype(jnp.float32))
    total = total + jnp.sum(m.astype(jnp.float32))
    count += m.size
  if count:
    out["total"] = total / count
  return out


def target_bits(params: Any, bits_by_name: dict[str, int]) -> Any:
  """The ``bits`` pytree of ``cga``: each param's bits by dotted path, 0 elsewhere (the
  values as given: ``rounded.cga_targets``'s ``CGATarget`` keep their scale axes)."""
  return jax.tree.map_with_path(lambda p, _: bits_by_name.get(dotted(state_path(p)), 0),
                                params)
