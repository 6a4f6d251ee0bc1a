"""``train_and_evaluate(config, workdir)``: the OFQ pipeline, float -> QAT -> CGA.

Data flow: the config is checked whole (``preflight``) and recorded
(``workdir/run.json``) before any work; each entry of ``config.stages`` becomes a
``stages.StagePlan`` when it starts; ``run_stage`` runs any plan the same way:
``step.create_train_state`` (restored from ``checkpoints/<stage>`` or the plan's fresh
state), the jitted train step, and every periodic action behind one ``_due`` test.

One jitted train step with explicit NamedShardings over a ``(data, fsdp)`` mesh;
global batches from host-local data; process 0 alone logs. Layout of ``workdir``:
``run.json``, ``metrics.jsonl``, ``tensorboard/<stage>``, ``checkpoints/<stage>/<step>``
(full training state, resumed automatically), ``models/<stage>`` (final parameters),
``summary.json``, ``plots/`` (``ofq_jax.plots``). Quantized stages track weight
oscillation (``config.tracking``, ``ofq_jax.models.tracker``) inside the step. SIGTERM
on any process stops every process at one agreed step, after saving it
(``ofq_jax.preemption``); rerunning the command resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from ofq_jax import data as data_lib
from ofq_jax import (config_keys, host_memory, losses, preemption, run_record, sharding, stages,
                     upgrades)
from ofq_jax import step as step_lib
from ofq_jax.checkpointing import Checkpointer, save_model_dir
from ofq_jax.errors import DivergedError, UserError
from ofq_jax.metrics import MetricsWriter, Progress
from ofq_jax.models import create_model, float_config, quantized_config
from ofq_jax.models.config import resolve_platform_defaults



@dataclasses.dataclass
class StageResult:
  top1: float
  top5: float
  steps: int
  frozen_fraction: float | None = None
  oscillating_fraction: float | None = None
  oscillation: dict[str, float] | None = None  # totals and module types, both definitions
  preempted: bool = False


def _log(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


def _due(step: int, every: int, total: int, *, at_end: bool = True) -> bool:
  """Whether a periodic action runs after ``step``: every ``every`` steps (never when
  ``every <= 0``); at the stage's last step exactly when ``at_end`` (the end has its own
  eval and checkpoint)."""
  if every <= 0:
    return False
  return at_end if step == total else step % every == 0


class _StageLog:
  """Everything a stage writes besides checkpoints: metrics, scales, evals, progress."""

  def __init__(self, plan: stages.StagePlan, run: stages.Run, spec: step_lib.StateSpec,
               start_step: int):
    config = run.config
    self.plan, self.run, self.spec = plan, run, spec
    self.progress = Progress(plan.name, plan.total_steps, start_step)
    self.writer = MetricsWriter(run.workdir, plan.name,
                                tensorboard=config.get("tensorboard", True))
    tracked = spec.tracker is not None
    self.tracking_metrics = step_lib.make_tracking_metrics_fn(spec) if tracked else None
    self.scales_every = config.tracking.scales_every_steps if tracked else 0
    self.scales = step_lib.make_scales_fn(spec) if self.scales_every else None
    self.eval_step = None  # compiled at the first eval, reused by every later one
    self.last_time, self.last_step = time.time(), start_step
    self.oscillating = None
    self.oscillation = None

  def check_loss(self, step: int, metrics: dict[str, Any], ckpt: Checkpointer) -> None:
    """Fetches the loss (steps stay asynchronous in between); NaN parameters keep it
    non-finite, so it is caught before the next save."""
    loss = float(metrics["train/loss"])
    if not math.isfinite(loss):
      raise DivergedError(
          f"[{self.plan.name}] loss is {loss} at step {step}; stopping. The last good "
          f"checkpoint is kept in {ckpt.directory} (steps {ckpt.steps()}). Lower the "
          "learning rate or enable optim.grad_clip_norm, then rerun to resume.")

  def step(self, step: int, state: step_lib.State, metrics: dict[str, Any],
           ckpt: Checkpointer) -> None:
    self.check_loss(step, metrics, ckpt)
    now, metrics = time.time(), dict(metrics)
    if self.tracking_metrics is not None:
      metrics.update(self.spec.tracker.named_metrics(
          jax.device_get(self.tracking_metrics(state))))
    metrics["train/images_per_sec"] = ((step - self.last_step) * self.run.config.batch_size /
                                       max(now - self.last_time, 1e-9))
    metrics["epoch"] = step / self.run.steps_per_epoch
    values = self.writer.write(step, metrics)
    self.progress.log(step, values)
    self.oscillating = values.get("osc/oscillating_fraction", self.oscillating)
    oscillation = {k: v for k, v in values.items() if _summarised(k)}
    self.oscillation = oscillation or self.oscillation
    self.last_time, self.last_step = time.time(), step

  def write_scales(self, step: int, state: step_lib.State) -> None:
    self.writer.write_vectors(step, self.scales(state))

  def eval(self, step: int, state: step_lib.State) -> dict[str, float]:
    if self.eval_step is None:
      self.eval_step = step_lib.make_eval_step(self.spec.graphdef)
    result = step_lib.evaluate(self.spec.graphdef, state["params"], state["buffers"],
                               self.run.source, self.run.mesh, self.run.config.eval_batch_size,
                               eval_step=self.eval_step)
    self.writer.write(step, {"eval/top1": result["top1"], "eval/top5": result["top5"]})
    self.progress.message(f"step {step}: eval top-1 {result['top1']:.2f}% top-5 "
                          f"{result['top5']:.2f}% ({result['count']} images)")
    return result


def _summarised(key: str) -> bool:
  """The oscillation numbers ``summary.json`` keeps per stage: totals (``osc/
  oscillating_fraction[_w<b>]``) and module types (``.../group/<g>``), both definitions."""
  prefix, _, rest = key.partition("/")
  return prefix in ("osc", "osc_grid") and rest.startswith("oscillating_fraction") and (
      "/" not in rest or rest.startswith("oscillating_fraction/group/"))


def _meta(plan: stages.StagePlan, spec: step_lib.StateSpec, step: int, **extra) -> dict:
  return {"step": step, "stage": plan.name, "data_position": step, "done": False,
          "tracked": spec.tracker is not None, **extra}


def run_stage(plan: stages.StagePlan, run: stages.Run, stop: preemption.StopSignal
              ) -> StageResult:
  """Trains ``plan`` from its newest checkpoint (or its fresh state) to its last step."""
  config = run.config
  spec = step_lib.create_train_state(plan.student, plan.tx, run.mesh, tracking=plan.tracking,
                                     min_size=config.fsdp_min_size)
  with Checkpointer(run.path("checkpoints", plan.name), keep=config.keep_checkpoints,
                    async_save=config.async_checkpointing, log=_log,
                    layout_version=upgrades.LAYOUT_VERSION) as ckpt:
    start, state, meta = _resume(plan, spec, ckpt)
    if meta.get("done"):
      _log(f"[{plan.name}] stage already complete (top-1 {meta['eval']['top1']:.2f}%)")
      return StageResult(steps=start, **meta["eval"])
    state = plan.fresh_state(spec) if state is None else state
    teacher = (None if plan.teacher is None else
               step_lib.place_teacher(plan.teacher, run.mesh, config.fsdp_min_size))
    train_step = step_lib.make_train_step(spec, plan.loss, plan.tx, plan.schedule,
                                          teacher=teacher)
    teacher_args = () if teacher is None else (teacher.state,)
    log, total = _StageLog(plan, run, spec, start), plan.total_steps
    batches = run.train_batches(plan.seed, start)
    for i in range(start + 1, total + 1):
      batch = sharding.global_batch(next(batches), run.mesh)
      state, metrics = train_step(state, batch, *teacher_args)
      if i == start + 1:
        host_memory.release_after_first_step(metrics)
      stopping = stop.agreed(i)
      if _due(i, config.log_every_steps, total):
        log.step(i, state, metrics, ckpt)
      if _due(i, log.scales_every, total):
        log.write_scales(i, state)
      if _due(i, config.eval_every_steps, total, at_end=False):
        log.eval(i, state)
      if _due(i, config.checkpoint_every_steps, total, at_end=False) or stopping:
        log.check_loss(i, metrics, ckpt)
        ckpt.save(i, state, _meta(plan, spec, i))
      preemption.after_step(plan.name, i, ckpt)
      if stopping:
        return _preempted(i, ckpt, log)
    return _finish(plan, run, spec, ckpt, state, log)


def _resume(plan: stages.StagePlan, spec: step_lib.StateSpec, ckpt: Checkpointer
            ) -> tuple[int, step_lib.State | None, dict[str, Any]]:
  """``(step, state, meta)`` of the newest readable checkpoint, or ``(0, None, {})``."""
  resumed = (ckpt.restore(spec.abstract, older_layouts=upgrades.older_layouts(spec, plan.tx))
             if ckpt.steps() else None)
  if resumed is None:
    return 0, None, {}
  _log(f"[{plan.name}] resumed from checkpoint {resumed[0]} in {ckpt.directory}")
  return resumed


def _preempted(step: int, ckpt: Checkpointer, log: _StageLog) -> StageResult:
  ckpt.wait()
  log.progress.message(f"SIGTERM: saved checkpoint {step}; rerun the same command to resume.")
  log.writer.close()
  return StageResult(top1=float("nan"), top5=float("nan"), steps=step, preempted=True)


def _finish(plan: stages.StagePlan, run: stages.Run, spec: step_lib.StateSpec,
            ckpt: Checkpointer, state: step_lib.State, log: _StageLog) -> StageResult:
  """Final eval, the done-checkpoint, and the stage's model directory."""
  total = plan.total_steps
  result = log.eval(total, state)
  log.writer.close()
  summary = {"top1": result["top1"], "top5": result["top5"], **plan.end_metrics(state)}
  if log.oscillating is not None:
    summary["oscillating_fraction"] = log.oscillating
    summary["oscillation"] = log.oscillation
  ckpt.save(total, state, _meta(plan, spec, total, done=True, eval=summary))
  ckpt.wait()
  nnx.update(plan.student, sharding.to_host(state["params"]),
             sharding.to_host(state["buffers"]))
  save_model_dir(run.path("models", plan.name), plan.student)
  return StageResult(steps=total, **summary)


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Every check that needs no data, before any work: stage names and order, the ranges
  of the stage, optimizer and schedule keys (``config_keys.TRAINING_KEYS``), the mesh
  and batch sizes, the quantized model's structure (bits, rules matching no
  layer, CGA targets), the KD option, each stage's inputs, and the run record."""
  names = tuple(stages.STAGES)
  if not config.stages or any(s not in names for s in config.stages):
    raise UserError(f"config.stages={tuple(config.stages)!r}: each must be one of {names}.")
  if [names.index(s) for s in config.stages] != sorted(names.index(s) for s in config.stages):
    raise UserError(f"config.stages={tuple(config.stages)!r} must follow the order {names}.")
  config_keys.check_training(config)  # ranges of the stage, optimizer and schedule keys
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch(config.batch_size, mesh)
  sharding.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
  quantized = None
  if any(stages.STAGES[s].quantized for s in config.stages):
    # Structure only (no arrays): bad bits and unmatched rules fail here.
    quantized = nnx.eval_shape(lambda: create_model(quantized_config(config.model)))
    losses.stage_loss(distill=True, num_classes=config.model.num_classes,
                      teacher_logits=config.kd.teacher_logits)
  else:
    nnx.eval_shape(lambda: create_model(float_config(config.model)))
  for name in config.stages:
    stages.STAGES[name].check(config, workdir, quantized)
  run_record.check(config, workdir)


validate_config = preflight  # the name before preflight checked inputs too


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs ``config.stages`` in ``workdir`` (resuming whatever is there); returns the
  summary also written to ``workdir/summary.json``."""
  start = time.time()
  workdir = os.path.abspath(workdir)
  config = resolve_platform_defaults(config)
  preflight(config, workdir)
  run = stages.Run(config, workdir, data_lib.build(config.data),
                   sharding.make_mesh(config.mesh.data, config.mesh.fsdp))
  run_record.write(config, workdir)
  results: dict[str, StageResult] = {}
  with preemption.StopSignal(config.get("stop_check_every_steps", 1)) as stop:
    for name in config.stages:
      results[name] = run_stage(stages.STAGES[name].build(config, run), run, stop)
      if results[name].preempted:
        break
  summary = _summary(results, time.time() - start)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    _print_table(results, summary)
    if config.get("plots", True):
      _draw_plots(workdir)
  return summary


def _summary(results: dict[str, StageResult], seconds: float) -> dict[str, Any]:
  summary: dict[str, Any] = {f"{k}_top1": v.top1 for k, v in results.items()}
  for result in results.values():
    if result.frozen_fraction is not None:
      summary["frozen_fraction"] = result.frozen_fraction
  for name, result in results.items():  # share of oscillating weights at the stage's end
    if result.oscillating_fraction is not None:
      summary[f"oscillating_fraction_{name}"] = result.oscillating_fraction
    if result.oscillation:
      summary[f"oscillation_{name}"] = result.oscillation
  summary["wall_seconds"] = seconds
  summary["preempted"] = any(r.preempted for r in results.values())
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
