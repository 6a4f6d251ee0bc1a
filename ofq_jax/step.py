"""One train state and its step: shared by training, evaluation and ``bench/train_step.py``.

The state is a dict, the on-disk layout of the stage checkpoints: ``params``,
``buffers`` (quantizer buffers), ``opt_state``, ``step``, and ``tracker`` (the
oscillation tracker's state) when oscillation is tracked. A dict rather than a
NamedTuple keeps every checkpoint written so far readable without a conversion layer.
``create_train_state`` derives every sharding from one abstract tree, built once per
stage; ``make_train_step`` jits ``(state, batch[, teacher_state]) -> (state, metrics)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from ofq_jax import cga, sharding
from ofq_jax.models.quantizers import QuantBuffer
from ofq_jax.models.tracker import OscillationTracker, create_tracker, weight_scales

State = dict[str, Any]
TEACHER_SCOPE = "teacher"


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """Everything static about a stage's train state."""
  graphdef: nnx.GraphDef
  mesh: Mesh
  shardings: State  # NamedShardings, keyed like the state
  abstract: State  # ShapeDtypeStructs carrying those shardings: the restore target
  tracker: OscillationTracker | None = None  # shapes only; names the tracked tensors
  tracker_graphdef: nnx.GraphDef | None = None


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The KD teacher, placed once per stage: structure, shardings and values."""
  graphdef: nnx.GraphDef
  shardings: Any
  state: Any


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
                       tracking: ml_collections.ConfigDict | None = None,
                       min_size: int = 2 ** 12) -> StateSpec:
  """The state's structure and shardings for ``model`` (values or shapes) trained by ``tx``.

  Parameters and optimizer moments follow the fsdp rule of ``sharding.state_shardings``
  (the tracker too, like the weights it follows); buffers and the step replicate.
  """
  graphdef, params, buffers = nnx.split(model, nnx.Param, QuantBuffer)
  shapes: State = {"params": params, "buffers": buffers,
                   "opt_state": jax.eval_shape(tx.init, params),
                   "step": jax.ShapeDtypeStruct((), jnp.int32)}
  tracker = create_tracker(model, tracking)
  tracker_graphdef = None
  if tracker is not None:
    tracker_graphdef, shapes["tracker"] = nnx.split(tracker)
  shardings = {key: sharding.state_shardings(value, mesh, min_size)
               for key, value in shapes.items()}
  shardings["buffers"] = jax.tree.map(lambda _: sharding.replicated(mesh), buffers)
  shardings["step"] = sharding.replicated(mesh)
  return StateSpec(graphdef, mesh, shardings, sharding.abstract(shapes, shardings), tracker,
                   tracker_graphdef)


def initial_state(model: nnx.Module, tx: optax.GradientTransformation, spec: StateSpec
                  ) -> State:
  """A fresh state at ``model``'s values: placed, ``tx.init``, step 0, tracker reset."""
  _, params, buffers = nnx.split(model, nnx.Param, QuantBuffer)
  params = sharding.place(sharding.to_host(params), spec.shardings["params"])
  buffers = sharding.place(sharding.to_host(buffers), spec.shardings["buffers"])
  state = {"params": params, "buffers": buffers,
           "opt_state": jax.jit(tx.init, out_shardings=spec.shardings["opt_state"])(params),
           "step": sharding.place(np.int32(0), spec.shardings["step"])}
  if spec.tracker is not None:
    state["tracker"] = tracker_start_fn(spec)(params, buffers)
  return state


def place_teacher(model: nnx.Module, mesh: Mesh, min_size: int = 2 ** 12, *,
                  abstract: bool = False) -> Teacher:
  """The teacher's values placed by the fsdp rule; ``abstract``: its shapes carrying those
  shardings (a plan's teacher, ``model`` then a structure)."""
  graphdef, state = nnx.split(model)
  shardings = sharding.state_shardings(state, mesh, min_size)
  values = (sharding.abstract(state, shardings) if abstract
            else sharding.place(state, shardings))
  return Teacher(graphdef, shardings, values)


def tracker_start_fn(spec: StateSpec) -> Callable[[Any, Any], Any]:
  """Jitted ``(params, buffers) -> tracker state`` starting at those parameters' levels."""
  template = spec.abstract["tracker"]

  def start(params, buffers):
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), template)
    tracker = nnx.merge(spec.tracker_graphdef, zeros)
    tracker.reset(nnx.merge(spec.graphdef, params, buffers))
    return nnx.state(tracker)
  return jax.jit(start, out_shardings=spec.shardings["tracker"])


def cga_fractions_fn(spec: StateSpec, tx: optax.GradientTransformation
                     ) -> Callable[[Any], dict[str, jax.Array]]:
  """Jitted ``params -> CGAState.frozen``: the fractions the CGA transform ``tx`` reports
  before its first update (its ``init``; the inner optimizer's state is traced away),
  sharded like the spec's."""
  return jax.jit(lambda params: tx.init(params).frozen,
                 out_shardings=spec.shardings["opt_state"].frozen)


def make_train_step(spec: StateSpec, loss: Callable[..., jax.Array],
                    tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    teacher: Teacher | None = None):
  """The jitted, state-donating ``(state, batch[, teacher_state]) -> (state, metrics)``.

  ``loss`` is the stage loss with its options bound: ``loss(logits, batch)``
  (``losses.float_loss``) or, with a ``teacher``, ``loss(logits, batch,
  teacher_logits)`` (``losses.distill_loss``). The frozen fractions of a ``cga``
  optimizer are read from its state, where its update left them.
  """
  def loss_fn(params, buffers, batch, teacher_state):
    # copy=True: fresh Variables inside this trace, so the image quantizer may update
    # its sign buffer.
    model = nnx.merge(spec.graphdef, params, buffers, copy=True)
    outputs = model(batch["image"], train=True)
    new_buffers = nnx.state(model, QuantBuffer)
    if teacher is None:
      return loss(outputs, batch), new_buffers
    with jax.named_scope(TEACHER_SCOPE):  # how a plan's census tells its dots apart
      teacher_logits = nnx.merge(teacher.graphdef, teacher_state)(batch["image"], train=True)
    return loss(outputs, batch, teacher_logits), new_buffers

  def step_fn(state, batch, teacher_state=None):
    (value, buffers), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["buffers"], batch, teacher_state)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"train/loss": value, "train/lr": schedule(state["step"]),
               "train/grad_norm": optax.tree.norm(grads)}
    fractions = cga.reported_fractions(opt_state)
    if fractions is not None:  # computed by this update from the pre-step weights
      fractions = dict(fractions)
      metrics["train/frozen_fraction"] = fractions.pop("total")
      metrics.update({f"cga/frozen/{k}": v for k, v in fractions.items()})
    new_state = {"params": params, "buffers": buffers, "opt_state": opt_state,
                 "step": state["step"] + 1}
    if spec.tracker_graphdef is not None:
      new_state["tracker"] = _track(spec.tracker_graphdef,
                                    nnx.merge(spec.graphdef, params, buffers),
                                    state["tracker"], new_state["step"])
    return new_state, metrics

  batch_sh = sharding.batch_sharding(spec.mesh)  # every batch entry (a pytree prefix)
  out = (spec.shardings, sharding.replicated(spec.mesh))  # metrics: readable everywhere
  if teacher is None:
    return jax.jit(lambda s, b: step_fn(s, b), in_shardings=(spec.shardings, batch_sh),
                   out_shardings=out, donate_argnums=0)
  return jax.jit(step_fn, in_shardings=(spec.shardings, batch_sh, teacher.shardings),
                 out_shardings=out, donate_argnums=0)


def _track(tracker_graphdef, model: nnx.Module, tracker_state, step: jax.Array):
  """One oscillation-tracking update (every ``every_steps`` steps)."""
  def update(state):
    tracker = nnx.merge(tracker_graphdef, state)
    tracker.update(model)
    return nnx.state(tracker)

  every = nnx.merge(tracker_graphdef, tracker_state).every_steps
  if every == 1:
    return update(tracker_state)
  return jax.lax.cond(step % every == 0, update, lambda s: s, tracker_state)


def make_tracking_metrics_fn(spec: StateSpec):
  """Jitted ``state -> stacked per-tensor numbers`` (``OscillationTracker.layer_metrics``);
  run at log steps only, so the train step carries nothing but the tracker update."""
  def metrics(params, buffers, tracker_state):
    tracker = nnx.merge(spec.tracker_graphdef, tracker_state)
    return tracker.layer_metrics(nnx.merge(spec.graphdef, params, buffers))
  jitted = jax.jit(metrics, out_shardings=sharding.replicated(spec.mesh))
  return lambda state: jitted(state["params"], state["buffers"], state["tracker"])


def make_scales_fn(spec: StateSpec):
  """Jitted ``state -> {"scales/<weight>": per-channel scale}`` for the scale
  trajectories, with ``"osc_channels/<weight>"`` (oscillating weights per channel) when
  the state tracks oscillation: the plots pick the most oscillating channels by it."""
  def vectors(params, buffers, tracker_state):
    out = {f"scales/{k}": v for k, v in
           weight_scales(nnx.merge(spec.graphdef, params, buffers)).items()}
    if tracker_state is not None:
      tracker = nnx.merge(spec.tracker_graphdef, tracker_state)
      out.update({f"osc_channels/{k}": v for k, v in tracker.channel_oscillating().items()})
    return out
  jitted = jax.jit(vectors, out_shardings=sharding.replicated(spec.mesh))
  return lambda state: jitted(state["params"], state["buffers"], state.get("tracker"))


def make_eval_step(graphdef: nnx.GraphDef):
  """The jitted ``(params, buffers, batch) -> (top-1 hits, top-5 hits, count)``; build it
  once per model structure and pass it to ``evaluate`` so repeated evals reuse it."""
  @jax.jit
  def counts(params, buffers, batch):
    model = nnx.merge(graphdef, params, buffers)
    logits = model(batch["image"], train=False)
    top5 = jnp.argsort(-logits, axis=-1)[:, :5]
    hit1 = (top5[:, 0] == batch["label"]).astype(jnp.float32)
    hit5 = jnp.any(top5 == batch["label"][:, None], axis=-1).astype(jnp.float32)
    mask = batch["mask"]
    return jnp.sum(hit1 * mask), jnp.sum(hit5 * mask), jnp.sum(mask)
  return counts


def evaluate(graphdef: nnx.GraphDef, params: Any, buffers: Any, source, mesh: Mesh,
             global_batch: int, *, eval_step=None) -> dict[str, float]:
  """Top-1 / top-5 (percent) over the eval split; padding is masked out, so every image
  counts exactly once whatever the number of hosts. ``eval_step``: from
  ``make_eval_step(graphdef)`` (built here when not given)."""
  counts = eval_step or make_eval_step(graphdef)
  total1 = total5 = count = 0.0
  for local in source.eval_batches(global_batch=global_batch,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count()):
    c1, c5, n = counts(params, buffers, sharding.global_batch(local, mesh))
    total1, total5, count = total1 + float(c1), total5 + float(c5), count + float(n)
  return {"top1": 100.0 * total1 / max(count, 1), "top5": 100.0 * total5 / max(count, 1),
          "count": int(count)}
