"""``train_and_evaluate(config, workdir)``: the OFQ pipeline, float -> QAT -> CGA.

Stages (``config.stages``, run in order, each resumable on its own):

* ``float``: train or fine-tune the float DeiT (CE on both heads).
* ``qat``: quantize the float teacher (``qat.teacher``: empty = this workdir's float
  stage, or a timm / FB DeiT file, or an ofq_jax model directory), calibrate the LSQ
  steps on one training batch, train with knowledge distillation (spec 5.1).
* ``cga``: resume the QAT state (parameters and AdamW moments), train at the QAT
  stage's constant ``min_lr`` with confidence-guided annealing (spec 4).

One jitted train step with explicit NamedShardings over a ``(data, fsdp)`` mesh;
global batches from host-local data; process 0 alone logs. Layout of ``workdir``:
``metrics.jsonl``, ``tensorboard/<stage>``, ``checkpoints/<stage>/<step>`` (full
training state, resumed automatically), ``models/<stage>`` (final parameters),
``summary.json``, ``plots/`` (``ofq_jax.plots``). Quantized stages track weight
oscillation (``config.tracking``, ``ofq_jax.models.tracker``) inside the step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from ofq_jax import data as data_lib
from ofq_jax import cga as cga_lib
from ofq_jax import compat, losses, optim, sharding
from ofq_jax.checkpointing import Checkpointer
from ofq_jax.interop import load_timm_deit, quantize_from_float
from ofq_jax.interop.checkpoints import float_config
from ofq_jax.metrics import MetricsWriter, Progress
from ofq_jax.models import calibrate, create_model
from ofq_jax.models.quantizers import QuantBuffer
from ofq_jax.models.rounded import cga_targets
from ofq_jax.models.tracker import create_tracker, weight_scales

STAGES = ("float", "qat", "cga")
FAULT_ENV = "OFQ_JAX_FAULT_AFTER_STEP"
"""Fault injection for preemption tests: ``STAGE:STEP`` SIGKILLs this process once the
checkpoint of that step of that stage is written; ``STAGE:STEP:term`` sends it SIGTERM
at that step instead (a preemption notice)."""


@dataclasses.dataclass
class StageResult:
  top1: float
  top5: float
  steps: int
  frozen_fraction: float | None = None
  oscillating_fraction: float | None = None
  preempted: bool = False


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can save and stop cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _log(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


def _model_configs(config) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  quant = copy.deepcopy(config.model)
  quant.quant.enabled = True
  return float_config(config.model), quant


def _place(tree: Any, shardings: Any) -> Any:
  """Host values (identical on every process) -> global arrays with ``shardings``."""
  def put(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def _host(tree: Any) -> Any:
  """Fully replicated copies on host (process-local numpy)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(_replicate(x))), tree)


def _replicate(x):
  if isinstance(x, jax.Array) and not x.is_fully_replicated:
    mesh = x.sharding.mesh
    return jax.jit(lambda y: y, out_shardings=sharding.replicated(mesh))(x)
  return x


def save_model(directory: str, model: nnx.Module) -> None:
  """Final parameters (and quantizer buffers) of a stage, for the next stage or export."""
  _, state = nnx.split(model)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), state, force=True)
  checkpointer.wait_until_finished()


def load_model(directory: str, model: nnx.Module) -> nnx.Module:
  """Restores ``save_model`` output into ``model`` (same config)."""
  _, state = nnx.split(model)
  abstract = jax.tree.map(compat.to_shape_dtype_struct, state)
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract)
  nnx.update(model, restored)
  return model


def _load_float_model(source: str, workdir: str, float_cfg) -> nnx.Module:
  """The float model a QAT / CGA stage starts from and distils from."""
  if not source:
    directory = os.path.join(workdir, "models", "float")
    if not os.path.isdir(directory):
      raise FileNotFoundError(
          f"No float model in {directory}: run the 'float' stage first (config.stages) or set "
          "--config.qat.teacher=PATH to a timm / FB DeiT file or an ofq_jax model directory.")
    return load_model(directory, create_model(float_cfg))
  if not os.path.exists(source):
    raise FileNotFoundError(f"Teacher / pretrained file {source!r} does not exist; point "
                            "config.qat.teacher at a timm / FB DeiT checkpoint (.pth, .npz, "
                            ".safetensors) or an ofq_jax model directory.")
  if os.path.isdir(source):
    return load_model(source, create_model(float_cfg))
  return load_timm_deit(source, float_cfg)


class _Stage:
  """One stage of ``train_and_evaluate``."""

  def __init__(self, name: str, config, workdir: str, source, mesh):
    self.name = name
    self.config = config
    self.scfg = config[name]
    self.workdir = workdir
    self.source = source
    self.mesh = mesh
    self.float_cfg, self.quant_cfg = _model_configs(config)
    self.model_cfg = self.float_cfg if name == "float" else self.quant_cfg
    self.steps_per_epoch = data_lib.steps_per_epoch(source, config.batch_size)
    if name == "cga":
      epochs = self.scfg.epochs
    else:
      epochs = self.scfg.epochs + self.scfg.get("cooldown_epochs", 0)
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                        else epochs * self.steps_per_epoch)
    self.seed = config.seed + STAGES.index(name)
    self.ckpt_dir = os.path.join(workdir, "checkpoints", name)
    self._eval_step = None  # compiled once, reused by every eval of the stage
    self.model_dir = os.path.join(workdir, "models", name)

  # ----------------------------------------------------------------- optimizer
  def schedule(self) -> optax.Schedule:
    if self.name == "cga":
      min_lr = self.config.qat.min_lr
      return lambda step: jnp.full((), min_lr, jnp.float32)
    s = self.scfg
    return optim.epoch_schedule(self.steps_per_epoch, base_lr=s.lr, epochs=s.epochs,
                                warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
                                min_lr=s.min_lr)

  def optimizer(self, params, schedule) -> optax.GradientTransformation:
    hyper = self.config.qat if self.name == "cga" else self.scfg
    tx = optim.adamw(schedule, weight_decay=hyper.weight_decay,
                     mask=optim.weight_decay_mask(params), b1=self.config.optim.b1,
                     b2=self.config.optim.b2, eps=self.config.optim.eps,
                     grad_clip_norm=self.config.optim.grad_clip_norm)
    return tx

  # ----------------------------------------------------------------- models
  def build(self):
    """(student, teacher or None) at their initial values for a fresh start."""
    if self.name == "float":
      if self.scfg.init_from:
        return _load_float_model(self.scfg.init_from, self.workdir, self.float_cfg), None
      return create_model(self.float_cfg, nnx.Rngs(self.seed)), None
    teacher = _load_float_model(self.config.qat.teacher, self.workdir, self.float_cfg)
    if self.name == "cga":  # its state comes from the QAT checkpoint; only the structure
      return create_model(self.quant_cfg, nnx.Rngs(self.seed)), teacher
    return quantize_from_float(teacher, self.quant_cfg, seed=self.seed), teacher

  # ----------------------------------------------------------------- run
  def run(self) -> StageResult:
    config = self.config
    progress = Progress(self.name, self.total_steps, 0)
    checkpointer = Checkpointer(self.ckpt_dir, keep=config.keep_checkpoints,
                                async_save=config.async_checkpointing, log=_log)
    try:
      return self._run(progress, checkpointer)
    finally:
      checkpointer.close()

  def _run(self, progress: Progress, checkpointer: Checkpointer) -> StageResult:
    config, mesh = self.config, self.mesh
    student, teacher = self.build()
    tracker = (create_tracker(student, config.get("tracking"))
               if self.name != "float" else None)
    graphdef, params, buffers = nnx.split(student, nnx.Param, QuantBuffer)
    schedule = self.schedule()
    inner = self.optimizer(params, schedule)
    cga_bits = None
    if self.name == "cga":
      # validate_config has checked that the targets match a StatsQ weight.
      bits_by_name = cga_targets(student, self.scfg.targets)
      cga_bits = cga_lib.target_bits(params, bits_by_name)
      tx = cga_lib.cga(inner, cga_bits, self.scfg.boundary_range)
    else:
      tx = inner

    param_sh = sharding.state_shardings(params, mesh, config.fsdp_min_size)
    buffer_sh = jax.tree.map(lambda _: sharding.replicated(mesh), buffers)
    opt_shape = jax.eval_shape(tx.init, params)
    opt_sh = sharding.state_shardings(opt_shape, mesh, config.fsdp_min_size)
    state_sh = {"params": param_sh, "buffers": buffer_sh, "opt_state": opt_sh,
                "step": sharding.replicated(mesh)}
    initial = {"params": params, "buffers": buffers, "opt_state": opt_shape,
               "step": jnp.int32(0)}
    tracker_graphdef = None
    if tracker is not None:  # oscillation state, sharded like the weights it follows
      tracker_graphdef, initial["tracker"] = nnx.split(tracker)
      state_sh["tracker"] = sharding.state_shardings(initial["tracker"], mesh,
                                                     config.fsdp_min_size)
    abstract_state = _abstract(initial, state_sh)

    teacher_state = teacher_graphdef = teacher_sh = None
    if teacher is not None:
      teacher_graphdef, teacher_state = nnx.split(teacher)
      teacher_sh = sharding.state_shardings(teacher_state, mesh, config.fsdp_min_size)
      teacher_state = _place(teacher_state, teacher_sh)

    resumed = checkpointer.restore(abstract_state) if checkpointer.steps() else None
    if resumed is not None:
      start_step, state, meta = resumed
      progress.message(f"resumed from checkpoint {start_step} in {self.ckpt_dir}")
      if meta.get("done"):
        progress.message(f"stage already complete (top-1 {meta['eval']['top1']:.2f}%)")
        return StageResult(steps=start_step, **meta["eval"])
    else:
      start_step = 0
      tracker_start = (tracker_start_fn(graphdef, tracker_graphdef, initial["tracker"],
                                         state_sh["tracker"]) if tracker is not None else None)
      state = self._initial_state(student, params, buffers, tx, state_sh, abstract_state,
                                  tracker_start)
    progress.start_step = start_step

    train_step = self._train_step_fn(graphdef, tx, schedule, teacher_graphdef, cga_bits,
                                     state_sh, teacher_sh, tracker_graphdef)
    scales_every = config.tracking.scales_every_steps if tracker is not None else 0
    tracking_metrics = (make_tracking_metrics_fn(graphdef, tracker_graphdef, mesh)
                        if tracker is not None else None)
    scales_fn = jax.jit(lambda p, b: weight_scales(nnx.merge(graphdef, p, b)),
                        out_shardings=sharding.replicated(mesh)) if scales_every else None
    writer = MetricsWriter(self.workdir, self.name,
                           tensorboard=config.get("tensorboard", True))
    batches = self.source.train_batches(
        global_batch=config.batch_size, start_step=start_step, seed=self.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    fault = (os.environ.get(FAULT_ENV, "") + "::").split(":")
    fault_step = int(fault[1]) if fault[0] == self.name else -1
    fault_signal = signal.SIGTERM if fault[2] == "term" else signal.SIGKILL
    last_log_time, last_log_step = time.time(), start_step
    frozen = oscillating = None
    with _Preemption() as preemption:
      for step in range(start_step + 1, self.total_steps + 1):
        batch = sharding.global_batch(next(batches), mesh)
        args = (state, batch) if teacher_state is None else (state, batch, teacher_state)
        state, metrics = train_step(*args)
        log_now = step % config.log_every_steps == 0 or step == self.total_steps
        periodic = step % config.checkpoint_every_steps == 0 and step != self.total_steps
        if log_now or periodic or preemption.requested:
          # The loss is fetched only here, so steps stay asynchronous in between; NaN
          # parameters keep the loss non-finite, so it is caught before the next save.
          self._check_loss(float(metrics["train/loss"]), step, checkpointer)
        if log_now:
          now = time.time()
          metrics = dict(metrics)
          if tracking_metrics is not None:
            metrics.update(tracker.named_metrics(jax.device_get(tracking_metrics(
                state["params"], state["buffers"], state["tracker"]))))
          metrics["train/images_per_sec"] = (
              (step - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9))
          metrics["epoch"] = step / self.steps_per_epoch
          values = writer.write(step, metrics)
          progress.log(step, values)
          frozen = values.get("train/frozen_fraction", frozen)
          oscillating = values.get("osc/oscillating_fraction", oscillating)
          last_log_time, last_log_step = time.time(), step
        if scales_fn is not None and (step % scales_every == 0 or step == self.total_steps):
          writer.write_vectors(step, {f"scales/{k}": v for k, v in
                                      scales_fn(state["params"], state["buffers"]).items()})
        if (config.eval_every_steps > 0 and step % config.eval_every_steps == 0
            and step != self.total_steps):
          self._log_eval(writer, progress, step, graphdef, state)
        if step == fault_step and fault_signal == signal.SIGTERM:
          os.kill(os.getpid(), signal.SIGTERM)
        if periodic or preemption.requested:
          checkpointer.save(step, state, {"step": step, "stage": self.name,
                                          "data_position": step, "done": False,
                                          "tracked": tracker is not None})
        if step == fault_step and fault_signal == signal.SIGKILL:
          checkpointer.wait()
          os.kill(os.getpid(), signal.SIGKILL)
        if preemption.requested:
          checkpointer.wait()
          progress.message(f"SIGTERM: saved checkpoint {step}; rerun the same command to "
                           "resume.")
          writer.close()
          return StageResult(top1=float("nan"), top5=float("nan"), steps=step,
                             preempted=True)

    result = self._log_eval(writer, progress, self.total_steps, graphdef, state)
    if self.name == "cga":
      fractions = cga_lib.frozen_fractions(state["params"], cga_bits,
                                           self.scfg.boundary_range)
      frozen = float(fractions["total"])
    writer.close()
    eval_meta = {"top1": result["top1"], "top5": result["top5"]}
    if frozen is not None:
      eval_meta["frozen_fraction"] = frozen
    if oscillating is not None:
      eval_meta["oscillating_fraction"] = oscillating
    checkpointer.save(self.total_steps, state, {"step": self.total_steps, "stage": self.name,
                                                "data_position": self.total_steps,
                                                "done": True, "eval": eval_meta,
                                                "tracked": tracker is not None})
    checkpointer.wait()
    nnx.update(student, _host(state["params"]), _host(state["buffers"]))
    save_model(self.model_dir, student)
    return StageResult(steps=self.total_steps, **eval_meta)

  def _check_loss(self, loss: float, step: int, checkpointer: Checkpointer) -> None:
    if not math.isfinite(loss):
      raise FloatingPointError(
          f"[{self.name}] loss is {loss} at step {step}; stopping. The last good checkpoint "
          f"is kept in {self.ckpt_dir} (steps {checkpointer.steps()}). Lower the learning "
          "rate or enable optim.grad_clip_norm, then rerun to resume.")

  def _initial_state(self, student, params, buffers, tx, state_sh, abstract_state,
                     tracker_start):
    """Fresh state: calibrated student (QAT), or the resumed QAT state (CGA)."""
    config = self.config
    if self.name == "qat":
      first = next(self.source.train_batches(
          global_batch=config.batch_size, start_step=0, seed=self.seed,
          process_index=jax.process_index(), process_count=jax.process_count()))
      placed = _place(nnx.state(student), jax.tree.map(
          lambda _: sharding.replicated(self.mesh), nnx.state(student)))
      nnx.update(student, placed)
      calibrate(student, sharding.global_batch(first, self.mesh)["image"])
      _, params, buffers = nnx.split(student, nnx.Param, QuantBuffer)
      params, buffers = _host(params), _host(buffers)
    if self.name == "cga":
      return self._resume_qat_state(state_sh, abstract_state, tracker_start)
    params = _place(params, state_sh["params"])
    buffers = _place(buffers, state_sh["buffers"])
    opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
    state = {"params": params, "buffers": buffers, "opt_state": opt_state,
             "step": _place(np.int32(0), state_sh["step"])}
    if tracker_start is not None:
      state["tracker"] = tracker_start(params, buffers)
    return state

  def _resume_qat_state(self, state_sh, abstract_state, tracker_start):
    """CGA starts from the QAT stage's last state, its AdamW moments included (spec 4.1),
    and its oscillation history when both stages track (else tracking starts afresh)."""
    directory = self.scfg.resume or os.path.join(self.workdir, "checkpoints", "qat")
    qat = Checkpointer(directory, keep=self.config.keep_checkpoints, async_save=False, log=_log)
    try:
      if not qat.steps():
        raise FileNotFoundError(f"No QAT checkpoint in {directory}: run the 'qat' stage first "
                                "or set --config.cga.resume=DIR (a checkpoints/qat folder).")
      inner_abstract = dict(abstract_state)
      inner_abstract["opt_state"] = abstract_state["opt_state"].inner
      qat_tracked = qat.read_meta(qat.steps()[-1]).get("tracked", False)
      if not qat_tracked:
        inner_abstract.pop("tracker", None)
      elif "tracker" not in inner_abstract:
        raise ValueError(f"The QAT checkpoints in {directory} track oscillation but this CGA "
                         "stage does not (config.tracking.enabled=False); keep tracking "
                         "enabled for CGA, as in the QAT run.")
      step, state, _ = qat.restore(inner_abstract)
    finally:
      qat.close()
    _log(f"[cga] starting from QAT checkpoint {step} in {directory}")
    state["opt_state"] = cga_lib.CGAState(state["opt_state"])
    state["step"] = _place(np.int32(0), state_sh["step"])
    if tracker_start is not None and "tracker" not in state:
      _log("[cga] the QAT checkpoint has no oscillation history; tracking starts now")
      state["tracker"] = tracker_start(state["params"], state["buffers"])
    return state

  def _train_step_fn(self, graphdef, tx, schedule, teacher_graphdef, cga_bits, state_sh,
                     teacher_sh, tracker_graphdef):
    loss = losses.stage_loss(distill=teacher_graphdef is not None,
                             num_classes=self.model_cfg.num_classes,
                             label_smoothing=self.config.get("label_smoothing", 0.0),
                             teacher_logits=self.config.kd.teacher_logits)
    teacher = None if teacher_graphdef is None else (teacher_graphdef, teacher_sh)
    return make_train_step(graphdef, tx, schedule, loss, mesh=self.mesh,
                           state_shardings=state_sh, teacher=teacher,
                           tracker_graphdef=tracker_graphdef, cga_bits=cga_bits,
                           boundary_range=self.scfg.get("boundary_range", 0.0))

  def _log_eval(self, writer, progress, step, graphdef, state) -> dict[str, float]:
    if self._eval_step is None:
      self._eval_step = make_eval_step(graphdef)
    result = evaluate(graphdef, state["params"], state["buffers"], self.source, self.mesh,
                      self.config.eval_batch_size, eval_step=self._eval_step)
    writer.write(step, {"eval/top1": result["top1"], "eval/top5": result["top5"]})
    progress.message(f"step {step}: eval top-1 {result['top1']:.2f}% top-5 "
                     f"{result['top5']:.2f}% ({result['count']} images)")
    return result


def tracker_start_fn(graphdef, tracker_graphdef, template, out_sharding):
  """``(params, buffers) -> tracker state`` starting at those parameters' levels."""
  def start(params, buffers):
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), template)
    tracker = nnx.merge(tracker_graphdef, zeros)
    tracker.reset(nnx.merge(graphdef, params, buffers))
    return nnx.state(tracker)
  return jax.jit(start, out_shardings=out_sharding)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss, *, mesh, state_shardings, teacher=None, tracker_graphdef=None,
                    cga_bits=None, boundary_range: float = 0.0):
  """The jitted train step ``(state, batch[, teacher_state]) -> (state, metrics)``.

  ``state`` is ``{"params", "buffers", "opt_state", "step"}`` (plus ``"tracker"``, the
  oscillation tracker's state, with ``tracker_graphdef``). ``loss`` is the stage loss:
  ``loss(logits, batch)`` (``losses.float_loss`` with its options bound) or, with
  ``teacher=(graphdef, shardings)``, ``loss(logits, batch, teacher_logits)``
  (``losses.distill_loss``). The state is donated; shardings are explicit on every
  input and output.
  """
  teacher_graphdef, teacher_shardings = teacher if teacher is not None else (None, None)

  def loss_fn(params, buffers, batch, teacher_state):
    # copy=True: fresh Variables inside this trace, so the image quantizer may update
    # its sign buffer.
    model = nnx.merge(graphdef, params, buffers, copy=True)
    outputs = model(batch["image"], train=True)
    new_buffers = nnx.state(model, QuantBuffer)
    if teacher_state is None:
      return loss(outputs, batch), new_buffers
    teacher_model = nnx.merge(teacher_graphdef, teacher_state)
    return loss(outputs, batch, teacher_model(batch["image"], train=True)), new_buffers

  def step_fn(state, batch, teacher_state=None):
    (loss, buffers), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["buffers"], batch, teacher_state)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"train/loss": loss, "train/lr": schedule(state["step"]),
               "train/grad_norm": optax.tree.norm(grads)}
    if cga_bits is not None:
      fractions = cga_lib.frozen_fractions(state["params"], cga_bits, boundary_range)
      metrics["train/frozen_fraction"] = fractions.pop("total")
      metrics.update({f"cga/frozen/{k}": v for k, v in fractions.items()})
    new_state = {"params": params, "buffers": buffers, "opt_state": opt_state,
                 "step": state["step"] + 1}
    if tracker_graphdef is not None:
      new_state["tracker"] = _track(tracker_graphdef, nnx.merge(graphdef, params, buffers),
                                    state["tracker"], new_state["step"])
    return new_state, metrics

  batch_sh = sharding.batch_sharding(mesh)  # every batch entry (a pytree prefix)
  metrics_sh = sharding.replicated(mesh)  # readable on every process
  if teacher_graphdef is None:
    return jax.jit(lambda s, b: step_fn(s, b), in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, metrics_sh), donate_argnums=0)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh, teacher_shardings),
                 out_shardings=(state_shardings, metrics_sh), donate_argnums=0)


def _track(tracker_graphdef, model: nnx.Module, tracker_state, step: jax.Array):
  """One oscillation-tracking update (every ``every_steps`` steps)."""
  def update(state):
    tracker = nnx.merge(tracker_graphdef, state)
    tracker.update(model)
    return nnx.state(tracker)

  every = nnx.merge(tracker_graphdef, tracker_state).every_steps
  if every == 1:
    tracker_state = update(tracker_state)
  else:
    tracker_state = jax.lax.cond(step % every == 0, update, lambda s: s, tracker_state)
  return tracker_state


def make_tracking_metrics_fn(graphdef, tracker_graphdef, mesh):
  """Jitted ``(params, buffers, tracker_state) -> stacked per-tensor numbers`` (see
  ``OscillationTracker.layer_metrics``); run at log steps only, so the train step itself
  carries nothing but the tracker update."""
  def metrics(params, buffers, tracker_state):
    tracker = nnx.merge(tracker_graphdef, tracker_state)
    return tracker.layer_metrics(nnx.merge(graphdef, params, buffers))
  return jax.jit(metrics, out_shardings=sharding.replicated(mesh))


def make_eval_step(graphdef):
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


def evaluate(graphdef, params, buffers, source, mesh, global_batch: int, *,
             eval_step=None) -> dict[str, float]:
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


def _check_inputs_exist(config, workdir: str) -> None:
  """Missing teacher / init / resume inputs fail before anything is written."""
  stages = tuple(config.stages)
  init_from = config.float.get("init_from", "")
  if "float" in stages and init_from and not os.path.exists(init_from):
    raise FileNotFoundError(f"config.float.init_from={init_from!r} does not exist; point it "
                            "at a timm / FB DeiT checkpoint or an ofq_jax model directory, or "
                            "leave it empty to train the float model from scratch.")
  if "qat" in stages or "cga" in stages:
    teacher = config.qat.teacher
    if teacher and not os.path.exists(teacher):
      raise FileNotFoundError(f"config.qat.teacher={teacher!r} does not exist; point it at a "
                              "timm / FB DeiT checkpoint (.pth, .npz, .safetensors) or an "
                              "ofq_jax model directory (workdir/models/float).")
    if not teacher and "float" not in stages and not os.path.isdir(
        os.path.join(workdir, "models", "float")):
      raise FileNotFoundError(
          f"No float model in {workdir}/models/float and config.qat.teacher is empty: add "
          "'float' to config.stages or set --config.qat.teacher=PATH.")
  if "cga" in stages and "qat" not in stages:
    resume = config.cga.resume or os.path.join(workdir, "checkpoints", "qat")
    if not os.path.isdir(resume):
      raise FileNotFoundError(f"CGA resumes a QAT state, but {resume} does not exist: add "
                              "'qat' to config.stages or set --config.cga.resume=DIR.")


def validate_config(config) -> None:
  """Clear errors for a bad training config before anything is written."""
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown or not config.stages:
    raise ValueError(f"config.stages={tuple(config.stages)!r}: each must be one of {STAGES}.")
  order = [STAGES.index(s) for s in config.stages]
  if order != sorted(order):
    raise ValueError(f"config.stages={tuple(config.stages)!r} must follow the order {STAGES}.")
  for key in ("log_every_steps", "checkpoint_every_steps", "batch_size", "eval_batch_size"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive.")
  if any(stage in ("qat", "cga") for stage in config.stages):
    # The quantized model's structure only (no arrays): bits, rules that match no layer
    # and CGA targets that match no StatsQ weight fail here, not after the float stage.
    student = nnx.eval_shape(lambda: create_model(_model_configs(config)[1]))
    losses.stage_loss(distill=True, num_classes=config.model.num_classes,
                      teacher_logits=config.kd.teacher_logits)
    if "cga" in config.stages and not cga_targets(student, config.cga.targets):
      raise ValueError(f"cga.targets={config.cga.targets!r} matches no StatsQ weight of the "
                       "quantized model (e.g. the LSQ baseline has none to anneal).")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs ``config.stages`` in ``workdir`` (resuming whatever is there); returns the
  summary also written to ``workdir/summary.json``."""
  start = time.time()
  validate_config(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch(config.batch_size, mesh)
  sharding.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
  source = data_lib.build(config.data)
  workdir = os.path.abspath(workdir)
  _check_inputs_exist(config, workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  results: dict[str, StageResult] = {}
  for stage in config.stages:
    results[stage] = _Stage(stage, config, workdir, source, mesh).run()
    if results[stage].preempted:
      break
  summary: dict[str, Any] = {f"{k}_top1": v.top1 for k, v in results.items()}
  if "cga" in results:
    summary["frozen_fraction"] = results["cga"].frozen_fraction
  for name, result in results.items():  # share of oscillating weights at the stage's end
    if result.oscillating_fraction is not None:
      summary[f"oscillating_fraction_{name}"] = result.oscillating_fraction
  summary["wall_seconds"] = time.time() - start
  summary["preempted"] = any(r.preempted for r in results.values())
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    _print_table(results, summary)
    if config.get("plots", True):
      _draw_plots(workdir)
  return summary


def _draw_plots(workdir: str) -> None:
  """PNGs in ``workdir/plots``; a plotting failure is reported, never fatal to the run."""
  from ofq_jax import plots  # pylint: disable=import-outside-toplevel
  try:
    paths = plots.make_plots(workdir)
  except Exception as error:  # pylint: disable=broad-except
    print(f"Plots not drawn ({type(error).__name__}: {error}); rerun with python -m "
          f"ofq_jax.plots --workdir={workdir}", flush=True)
    return
  if paths:
    print(f"plots: {', '.join(paths)}", flush=True)


def _print_table(results: dict[str, StageResult], summary: dict[str, Any]) -> None:
  lines = ["", "stage   top-1 %   top-5 %   steps   frozen   oscillating"]
  for name, r in results.items():
    frozen = "" if r.frozen_fraction is None else f"{r.frozen_fraction:.4f}"
    osc = "" if r.oscillating_fraction is None else f"{r.oscillating_fraction:.4f}"
    lines.append(f"{name:<7} {r.top1:>7.2f}   {r.top5:>7.2f}   {r.steps:>5}   {frozen:<6}   "
                 f"{osc}")
  lines.append(f"wall time {summary['wall_seconds']:.1f} s")
  print("\n".join(lines), flush=True)
