"""The stages of OFQ as data: one builder per stage makes a ``StagePlan``.

This is the only module that knows the stage names. A plan holds what differs between
``float``, ``qat`` and ``cga`` (models, optimizer, schedule, loss, steps, how to make the
fresh state, what to report at the end); ``train.run_stage`` runs any plan the same way.
Adding a stage means adding a builder and its input check to ``STAGES``.

* ``float``: train or fine-tune the float DeiT (CE on both heads).
* ``qat``: quantize the float teacher (``qat.teacher``: empty = this workdir's float
  stage, or a timm / FB DeiT file, or an ofq_jax model directory), calibrate the LSQ
  steps on one training batch, train with knowledge distillation (spec 5.1).
* ``cga``: resume the QAT state (parameters and AdamW moments), train at the QAT
  stage's constant ``min_lr`` with confidence-guided annealing (spec 4); with
  ``cga.include_qk`` QKR's ``W_qk`` is a parameter here and annealed too
  (``product_form``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from ofq_jax import cga, losses, optim, product_form, run_record, sharding, step, upgrades
from ofq_jax.checkpointing import Checkpointer, load_model_dir
from ofq_jax.data import DataShape, DataSource, steps_per_epoch
from ofq_jax.errors import MissingInputError, UserError
from ofq_jax.interop import quantize_from_float
from ofq_jax.interop import load_float
from ofq_jax.models import calibrate, create_model, family_of, float_config, quantized_config
from ofq_jax.models.config import PRECISIONS, stored_model_differences
from ofq_jax.models.rounded import cga_targets


@dataclasses.dataclass(frozen=True)
class Run:
  """What every stage of one ``train_and_evaluate`` call shares.

  ``abstract``: the plans hold model structures only (``nnx.eval_shape``: no parameter
  is allocated, no checkpoint or data read); ``source`` may then be a ``DataShape``.
  A plan (``ofq_jax.plan``) compiles such stages for a pod it does not have."""
  config: ml_collections.ConfigDict
  workdir: str
  source: DataSource | DataShape
  mesh: Mesh
  abstract: bool = False

  def model(self, make: Callable[[], nnx.Module]) -> nnx.Module:
    """``make()``, or its structure alone in an abstract run."""
    return nnx.eval_shape(make) if self.abstract else make()

  def seed(self, stage: str) -> int:
    """The stage's seed: ``config.seed`` plus the stage's index in the pipeline."""
    return self.config.seed + tuple(STAGES).index(stage)

  @property
  def steps_per_epoch(self) -> int:
    return steps_per_epoch(self.source, self.config.batch_size)

  def total_steps(self, epochs: int) -> int:
    """``epochs`` of steps, or ``num_train_steps`` when set (> 0)."""
    steps = self.config.num_train_steps
    return steps if steps > 0 else epochs * self.steps_per_epoch

  def train_batches(self, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the global batches from ``start_step`` on."""
    return self.source.train_batches(
        global_batch=self.config.batch_size, start_step=start_step, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)


def _no_metrics(state: step.State) -> dict[str, float]:
  del state
  return {}


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Everything that makes one stage what it is; ``name`` only labels its outputs."""
  name: str  # directories, log prefix, summary keys; never branched on
  student: nnx.Module  # values (float, qat) or a structure whose values come from elsewhere
  teacher: nnx.Module | None
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss: Callable[..., jax.Array]  # losses.float_loss or distill_loss, options bound
  total_steps: int
  seed: int  # of the data order (and the model init of the float stage)
  tracking: ml_collections.ConfigDict | None
  fresh_state: Callable[[step.StateSpec], step.State]  # when checkpoints/<name> is empty
  end_metrics: Callable[[step.State], dict[str, float]] = _no_metrics


# ----------------------------------------------------------------------------- helpers
def load_float_model(source: str, workdir: str, model_config) -> nnx.Module:
  """The float model a stage starts from or distils from: ``source`` (a timm / FB DeiT
  or torchvision Swin file, by ``model_config.arch``, or an ofq_jax model directory), or
  this workdir's float stage when empty."""
  cfg = float_config(model_config)
  directory = source or os.path.join(workdir, "models", "float")
  if os.path.isdir(directory):
    return load_model_dir(directory, create_model(cfg))
  return load_float(source, cfg)


def teacher_config(config) -> ml_collections.ConfigDict:
  """The KD teacher's model: the float model at ``kd.teacher_precision``."""
  model = float_config(config.model)
  model.precision = config.kd.get("teacher_precision", model.precision)
  return model


def load_teacher(config, workdir: str) -> nnx.Module:
  """The KD teacher (``qat.teacher``) at the precision ``kd.teacher_precision`` asks for."""
  return load_float_model(config.qat.teacher, workdir, teacher_config(config))


def _teacher(config, run: Run) -> nnx.Module:
  if run.abstract:
    return run.model(lambda: create_model(teacher_config(config)))
  return load_teacher(config, run.workdir)


def _adamw(config, hyper, schedule: optax.Schedule, student: nnx.Module, *,
           own_count_for_product: bool = False) -> optax.GradientTransformation:
  """The stage's AdamW; ``own_count_for_product``: QKR's ``W_qk`` parameters (the product
  form, ``cga.include_qk``) get their own moments and step count (``optim.adamw``)."""
  params = nnx.state(student, nnx.Param)
  own = product_form.own_count_mask(params) if own_count_for_product else None
  return optim.adamw(schedule, weight_decay=hyper.weight_decay,
                     mask=optim.weight_decay_mask(
                         params, family_of(student.config).no_decay), b1=config.optim.b1,
                     b2=config.optim.b2, eps=config.optim.eps,
                     grad_clip_norm=config.optim.grad_clip_norm, own_count=own)


def _epoch_schedule(hyper, run: Run) -> optax.Schedule:
  return optim.epoch_schedule(run.steps_per_epoch, base_lr=hyper.lr, epochs=hyper.epochs,
                              warmup_epochs=hyper.warmup_epochs, warmup_lr=hyper.warmup_lr,
                              min_lr=hyper.min_lr)


def _loss(config, *, distill: bool) -> Callable[..., jax.Array]:
  return losses.stage_loss(distill=distill, num_classes=config.model.num_classes,
                           label_smoothing=config.get("label_smoothing", 0.0),
                           teacher_logits=config.kd.teacher_logits)


# ----------------------------------------------------------------------------- builders
def build_float_plan(config, run: Run) -> StagePlan:
  hyper, seed = config.float, run.seed("float")
  if hyper.init_from and not run.abstract:
    student = load_float_model(hyper.init_from, run.workdir, config.model)
  else:
    student = run.model(lambda: create_model(float_config(config.model), nnx.Rngs(seed)))
  schedule = _epoch_schedule(hyper, run)
  tx = _adamw(config, hyper, schedule, student)
  return StagePlan(
      "float", student, None, tx, schedule, _loss(config, distill=False),
      run.total_steps(hyper.epochs + hyper.cooldown_epochs), seed, None,
      fresh_state=lambda spec: step.initial_state(student, tx, spec))


def build_qat_plan(config, run: Run) -> StagePlan:
  hyper, seed = config.qat, run.seed("qat")
  teacher = _teacher(config, run)
  if run.abstract:  # the structure quantize_from_float gives
    student = run.model(lambda: create_model(quantized_config(config.model), nnx.Rngs(seed)))
  else:
    student = quantize_from_float(teacher, quantized_config(config.model), seed=seed)
  schedule = _epoch_schedule(hyper, run)
  tx = _adamw(config, hyper, schedule, student)

  def fresh(spec: step.StateSpec) -> step.State:
    """Calibrates the LSQ steps on the first training batch, then starts there."""
    state = nnx.state(student)
    nnx.update(student, sharding.place(
        state, jax.tree.map(lambda _: sharding.replicated(run.mesh), state)))
    first = sharding.global_batch(next(run.train_batches(seed)), run.mesh)
    calibrate(student, first["image"])
    return step.initial_state(student, tx, spec)

  return StagePlan("qat", student, teacher, tx, schedule, _loss(config, distill=True),
                   run.total_steps(hyper.epochs + hyper.cooldown_epochs), seed,
                   config.get("tracking"), fresh_state=fresh)


def build_cga_plan(config, run: Run) -> StagePlan:
  hyper, seed = config.cga, run.seed("cga")
  teacher = _teacher(config, run)
  # Only the structure matters: the values come from the QAT checkpoint.
  student = nnx.eval_shape(lambda: create_model(product_form.cga_model_config(config),
                                                nnx.Rngs(seed)))
  bits = cga.target_bits(nnx.state(student, nnx.Param),
                         cga_targets(student, cga.stage_targets(hyper)))
  min_lr = config.qat.min_lr
  schedule = lambda count: jnp.full((), min_lr, jnp.float32)  # constant, no cooldown
  tx = cga.cga(_adamw(config, config.qat, schedule, student,
                      own_count_for_product=cga.include_qk(hyper)),
               bits, hyper.boundary_range)

  # Jitted: op by op, a Swin-T's 100-odd targets cost seconds of dispatch.
  frozen_total = jax.jit(lambda params: cga.frozen_fractions(params, bits,
                                                             hyper.boundary_range)["total"])

  def end_metrics(state: step.State) -> dict[str, float]:
    """Frozen share of the final (post-step) weights."""
    return {"frozen_fraction": float(frozen_total(state["params"]))}

  return StagePlan("cga", student, teacher, tx, schedule, _loss(config, distill=True),
                   run.total_steps(hyper.epochs), seed, config.get("tracking"),
                   fresh_state=lambda spec: _state_from_qat(config, run, spec, tx),
                   end_metrics=end_metrics)


def _state_from_qat(config, run: Run, spec: step.StateSpec,
                    tx: optax.GradientTransformation) -> step.State:
  """CGA starts from the QAT stage's last state, its AdamW moments included (spec 4.1),
  and its oscillation history when both stages track (else tracking starts afresh).
  With ``cga.include_qk`` the QAT factors become the product (``product_form``)."""
  directory = config.cga.resume or run.path("checkpoints", "qat")
  target = dict(spec.abstract, opt_state=spec.abstract["opt_state"].inner)
  qat_spec = product_form.qat_layout(config, run.mesh, lambda student: _adamw(
      config, config.qat, lambda count: jnp.full((), config.qat.min_lr, jnp.float32), student))
  with Checkpointer(directory, keep=config.keep_checkpoints, async_save=False,
                    layout_version=upgrades.LAYOUT_VERSION) as qat:
    if not qat.steps():
      raise MissingInputError(f"No QAT checkpoint in {directory}: run the 'qat' stage first "
                              "or set --config.cga.resume=DIR (a checkpoints/qat folder).")
    abstract = dict(target if qat_spec is None else qat_spec.abstract)
    if not qat.read_meta(qat.steps()[-1]).get("tracked", False):
      abstract.pop("tracker", None)
    elif "tracker" not in abstract:
      raise UserError(f"The QAT checkpoints in {directory} track oscillation but this CGA "
                      "stage does not (config.tracking.enabled=False); keep tracking "
                      "enabled for CGA, as in the QAT run.")
    older = upgrades.older_layouts(qat_spec or spec, abstract=abstract)
    qat_step, state, _ = qat.restore(abstract, older_layouts=older)
  _log(f"[cga] starting from QAT checkpoint {qat_step} in {directory}")
  if qat_spec is not None:
    state = product_form.from_qat_state(state, qat_spec, spec, target, _log)
  state["opt_state"] = cga.CGAState(state["opt_state"],
                                    step.cga_fractions_fn(spec, tx)(state["params"]))
  state["step"] = sharding.place(np.int32(0), spec.shardings["step"])
  if spec.tracker is not None and "tracker" not in state:
    _log("[cga] the QAT checkpoint has no oscillation history; tracking starts now")
    state["tracker"] = step.tracker_start_fn(spec)(state["params"], state["buffers"])
  return state


# ----------------------------------------------------------------------------- input checks
def _exists(key: str, value: str, what: str) -> None:
  if value and not os.path.exists(value):
    raise MissingInputError(f"config.{key}={value!r} does not exist; point it at {what}.")


def check_float(config, workdir: str, quantized: nnx.Module | None) -> None:
  del workdir, quantized
  _exists("float.init_from", config.float.get("init_from", ""),
          "a timm / FB DeiT checkpoint or an ofq_jax model directory, or leave it empty to "
          "train the float model from scratch")


def check_qat(config, workdir: str, quantized: nnx.Module | None) -> None:
  del quantized
  precision = config.kd.get("teacher_precision", "highest")
  if precision not in PRECISIONS:
    raise UserError(f"kd.teacher_precision={precision!r} is not one of {PRECISIONS}.")
  teacher = config.qat.teacher
  _exists("qat.teacher", teacher, "a timm / FB DeiT checkpoint (.pth, .npz, .safetensors) "
          "or an ofq_jax model directory (workdir/models/float)")
  if not teacher and "float" not in config.stages and not os.path.isdir(
      os.path.join(workdir, "models", "float")):
    raise MissingInputError(
        f"No float model in {workdir}/models/float and config.qat.teacher is empty: add "
        "'float' to config.stages or set --config.qat.teacher=PATH.")


def _check_resumed_model(config) -> None:
  """``cga.resume`` from another workdir (``OTHER/checkpoints/qat``): its QAT model, as that
  run recorded it, must be this one; restoring would succeed (2- and 4-bit states have the
  same shapes) and anneal the weights at the wrong bit-width."""
  other = os.path.dirname(os.path.dirname(os.path.abspath(config.cga.resume)))
  recorded = run_record.recorded_model(other)
  if recorded is None:
    return
  recorded.quant.enabled = True  # what its QAT stage trained
  differences = stored_model_differences(recorded, quantized_config(config.model))
  if differences:
    listed = "; ".join(f"model.{d}" for d in differences)
    raise UserError(f"config.cga.resume={config.cga.resume!r} holds a QAT state of another "
                    f"model ({listed}; recorded in {other}/{run_record.FILE}); resume a QAT "
                    "run of this model, or set those keys as that run had them.")


def check_cga(config, workdir: str, quantized: nnx.Module | None) -> None:
  check_qat(config, workdir, quantized)
  resume = config.cga.resume or os.path.join(workdir, "checkpoints", "qat")
  if "qat" not in config.stages and not os.path.isdir(resume):
    raise MissingInputError(f"CGA resumes a QAT state, but {resume} does not exist: add "
                            "'qat' to config.stages or set --config.cga.resume=DIR.")
  if config.cga.resume:
    _check_resumed_model(config)
  product_form.check_config(config)
  if quantized is not None and not cga_targets(quantized, config.cga.targets):
    raise UserError(f"cga.targets={config.cga.targets!r} matches no StatsQ weight of the "
                    "quantized model (e.g. the LSQ baseline has none to anneal).")


class Stage(NamedTuple):
  build: Callable[[Any, Run], StagePlan]  # called when the stage starts
  check: Callable[[Any, str, nnx.Module | None], None]  # before any stage starts
  quantized: bool  # trains the quantized model (its structure is checked up front)


STAGES: dict[str, Stage] = {
    "float": Stage(build_float_plan, check_float, quantized=False),
    "qat": Stage(build_qat_plan, check_qat, quantized=True),
    "cga": Stage(build_cga_plan, check_cga, quantized=True),
}
"""The pipeline, in its order."""


def _log(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)
