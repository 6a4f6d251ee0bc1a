"""CGA on QKR's product (``cga.include_qk``): a QAT train state moved into the product form.

QAT trains ``W_q`` and ``W_k`` (``model.quant.qk_form='factors'``, the reference); a CGA
stage that anneals ``W_qk`` trains the product itself (``'product'``: one parameter
``qk_kernel`` ``(H, D, D)`` per attention), because only a parameter can be frozen entry
by entry (spec 4.4). ``to_product_form`` maps a restored QAT state onto the CGA
student's layout:

* ``qk_kernel`` is ``W_q^T W_k`` of the QAT factors, computed by
  ``QKRAttention.qk_product`` (the expression and precision of the QAT forward), so CGA
  starts from exactly the attention QAT ended with;
* every other parameter and its AdamW moments, the Adam count, the buffers, the step
  and the oscillation tracker's state of every rounded tensor are carried over
  unchanged (``qk_product`` keeps its name and shape; the tracker's extra state of the
  factors, which the product form no longer has, is dropped);
* ``qk_kernel``'s moments (mu, nu) start at zero: the product had no moments of its
  own in QAT, and those of ``W_q``, ``W_k`` belong to other coordinates (no map takes
  them to the product's). Its AdamW is a group of its own (``optim.adamw(own_count=)``)
  whose step count starts at zero too, so its first updates are bias-corrected like a
  fresh Adam's (torch counts steps per parameter). Under the QAT count they were not:
  with a steady gradient they reached ~6x the steady size within tens of steps and
  settled over ~1000, longer than a digits CGA stage.

``W_qk`` is weight-decayed at the QAT rate, as ``W_q``, ``W_k`` were (timm's rule: a
weight of more than one dimension); frozen entries are restored, so only the in-band
ones see it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from ofq_jax import cga, optim, step
from ofq_jax.errors import UserError
from ofq_jax.models import create_model, quantized_config
from ofq_jax.models.attention import QKRAttention
from ofq_jax.models.config import qk_form, with_qk_form
from ofq_jax.paths import dotted, state_path

State = dict[str, Any]
PRODUCT = "qk_kernel"
"""The product form's parameter name (``QKRAttention.qk_kernel``)."""


def cga_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CGA student's model: the quantized model, with QKR in its product form
  (``W_qk`` a parameter) when ``cga.include_qk`` anneals it."""
  model = quantized_config(config.model)
  return with_qk_form(model, "product") if cga.include_qk(config.cga) else model


def check_config(config: ml_collections.ConfigDict) -> None:
  """``cga.include_qk`` needs a product to anneal: QKR attention."""
  if cga.include_qk(config.cga) and config.model.quant.attention != "qkr":
    raise UserError("cga.include_qk=True anneals QKR's W_q^T W_k product, but "
                    f"model.quant.attention={config.model.quant.attention!r} has none; use "
                    "attention='qkr' or cga.include_qk=False.")


def own_count_mask(params: Any) -> Any:
  """True at the product parameters: their AdamW moments and step count are a group of
  their own (``optim.adamw(own_count=)``), started at zero."""
  return jax.tree.map_with_path(lambda p, _: state_path(p)[-1] == PRODUCT, params)


def qat_layout(config: ml_collections.ConfigDict, mesh: Mesh,
               optimizer: Callable[[nnx.Module], optax.GradientTransformation]
               ) -> step.StateSpec | None:
  """The QAT checkpoints' layout when it differs from the CGA student's (QKR's factors
  there, the product here: ``cga.include_qk``), else None; ``optimizer(student)`` is the
  QAT stage's optimizer."""
  qat_model = quantized_config(config.model)
  if qk_form(qat_model.quant) == qk_form(cga_model_config(config).quant):
    return None
  student = nnx.eval_shape(lambda: create_model(qat_model, nnx.Rngs(0)))  # a structure
  return step.create_train_state(student, optimizer(student), mesh,
                                 tracking=config.get("tracking"),
                                 min_size=config.fsdp_min_size)


def from_qat_state(state: State, qat_spec: step.StateSpec, spec: step.StateSpec,
                   target: State, log: Callable[[str], None]) -> State:
  """A restored QAT ``state`` in the CGA student's layout (``to_product_form``); tracking
  restarts if the trackers do not line up."""
  shardings = dict(spec.shardings, opt_state=spec.shardings["opt_state"].inner)
  try:
    state = to_product_form(state, qat_spec.graphdef, target, shardings)
  except KeyError as error:
    if "tracker" not in state:
      raise
    log(f"[cga] the QAT oscillation history does not fit the product form ({error}); "
        "tracking starts now")
    state = to_product_form({k: v for k, v in state.items() if k != "tracker"},
                            qat_spec.graphdef,
                            {k: v for k, v in target.items() if k != "tracker"}, shardings)
  log("[cga] cga.include_qk: W_qk = W_q^T W_k of the QAT factors; its AdamW moments and "
      "step count start at zero")
  return state


def qk_products(graphdef: nnx.GraphDef, params: Any, buffers: Any) -> dict[str, jax.Array]:
  """``{dotted path of the attention: W_qk}`` of every factors-form QKR attention."""
  model = nnx.merge(graphdef, params, buffers)
  return {dotted(tuple(path)): module.qk_product() for path, module in nnx.iter_modules(model)
          if isinstance(module, QKRAttention) and module.qk_kernel is None}


def carry(target: Any, source: Any, fill: Callable[[tuple[str | int, ...], Any], jax.Array],
          rename: Callable[[str], str | None] = lambda key: key) -> Any:
  """``target``'s structure (abstract leaves) with each leaf taken from ``source`` at the
  same key path (same shape and dtype, else a KeyError); ``fill(state path, abstract
  leaf)`` makes the leaves ``source`` does not have. ``rename`` maps a target key path
  (``jax.tree_util.keystr``) to the source's (None: not in the source). Extra ``source``
  leaves are dropped."""
  found = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}

  def take(path, leaf):
    key = rename(jax.tree_util.keystr(path))
    value = None if key is None else found.get(key)
    if value is None:
      return fill(state_path(path), leaf)
    if (tuple(value.shape), value.dtype) != (tuple(leaf.shape), leaf.dtype):
      raise KeyError(f"{jax.tree_util.keystr(path)}: {value.shape} {value.dtype} in the QAT "
                     f"state, {leaf.shape} {leaf.dtype} expected")
    return value
  return jax.tree_util.tree_map_with_path(take, target)


def _product_param(products: dict[str, jax.Array]):
  def fill(path, leaf):
    if path[-1] != PRODUCT:
      raise KeyError(f"{dotted(path)} is not in the QAT state")
    return products[dotted(path[:-1])].astype(leaf.dtype)
  return fill


_GROUP = ".inner_states['{}'].inner_state"


def _qat_optimizer_key(key: str) -> str | None:
  """The QAT AdamW's key path of a CGA optimizer entry: the shared group's entries are
  the QAT ones; the product's own group (moments and count) is new."""
  if _GROUP.format(optim.OWN) in key:
    return None
  return key.replace(_GROUP.format(optim.SHARED), "")


def _zero_moment(path, leaf):
  """The product's own AdamW group (its moments and its step count): zero."""
  if optim.OWN not in path:
    raise KeyError(f"optimizer entry {dotted(path)} is not in the QAT state")
  return jnp.zeros(leaf.shape, leaf.dtype)


def _missing(path, leaf):
  del leaf
  raise KeyError(f"tracker entry {dotted(path)} is not in the QAT state")


def to_product_form(state: State, qat_graphdef: nnx.GraphDef, target: State,
                    shardings: State) -> State:
  """The QAT ``state`` (params, buffers, plain AdamW ``opt_state``, step[, tracker]) in
  the layout of ``target`` (abstract: the CGA student's params, its optimizer's inner
  state as ``opt_state``[, tracker]), placed on ``shardings`` (keyed alike). Raises
  KeyError when the tracker states do not line up (the caller restarts tracking)."""
  keys = [k for k in ("params", "opt_state", "tracker") if k in target and k in state]

  def convert(params, buffers, opt_state, tracker):
    products = qk_products(qat_graphdef, params, buffers)
    out = {"params": carry(target["params"], params, _product_param(products)),
           "opt_state": carry(target["opt_state"], opt_state, _zero_moment,
                              _qat_optimizer_key)}
    if tracker is not None:
      out["tracker"] = carry(target["tracker"], tracker, _missing)
    return out

  converted = jax.jit(convert, out_shardings={k: shardings[k] for k in keys})(
      state["params"], state["buffers"], state["opt_state"], state.get("tracker"))
  return dict(state, **converted)
