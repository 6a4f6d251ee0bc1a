"""Each stage's real train step, built abstractly and compiled for a TPU topology.

The stages are built by the functions training uses (``stages.STAGES``,
``step.create_train_state``, ``step.make_train_step``, the KD teacher) in an abstract
``stages.Run``: models are structures (``nnx.eval_shape``), the state and the batch are
``ShapeDtypeStruct``s carrying the shardings of the config's mesh laid over the
topology's devices, so no parameter is allocated and no file is read; a DeiT-B plan
needs no more host memory than a DeiT-T one. The step is traced for the TPU
(``target.compiling_for``), its dots counted (``census``), then compiled by libtpu.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import AxisType, Mesh

from ofq_jax import data as data_lib
from ofq_jax import sharding, stages, target
from ofq_jax import step as step_lib
from ofq_jax.errors import UserError
from ofq_jax.models import explain
from ofq_jax.plan import census as census_lib
from ofq_jax.plan import estimate, program
from ofq_jax.plan.topology import Topology, compile_only, device_grid
from ofq_jax.quant import integer


@dataclasses.dataclass(frozen=True)
class StageReport:
  """One stage's compiled step on one topology: what a device needs and does.

  ``refused``: libtpu's message when the step does not fit at all (it refuses to compile
  it); ``memory`` then holds just the temporaries it asked for, and the numbers that need
  a program (cost, roofline, collectives) are absent."""
  stage: str
  per_device_batch: int
  global_batch: int
  memory: program.Memory
  capacity: int  # what a program may use of a device's HBM, bytes
  dots: census_lib.DotCensus  # the whole step's
  steps: int  # the stage's steps at this global batch
  steps_per_epoch: int
  fsdp_sharded: tuple[tuple[str, int], ...]  # (parameter, bytes) the fsdp axis shards
  replicated_bytes: int  # parameter bytes every device holds whole
  compile_seconds: float
  flops: float = 0.0  # per device and step (XLA)
  bytes: float = 0.0  # per device and step (XLA)
  roofline: estimate.Roofline | None = None
  utilisation: float = 0.0
  collectives: tuple[program.Collective, ...] = ()
  refused: str | None = None
  products: tuple[integer.Decision, ...] = ()  # the student's, as traced for the TPU

  @property
  def fits(self) -> bool:
    return self.refused is None and self.memory.total <= self.capacity

  @property
  def step_seconds(self) -> float:
    """The roofline step time (NaN for a step libtpu refused)."""
    return self.roofline.step_seconds if self.roofline else float("nan")

  @property
  def images_per_second(self) -> float:
    """Per device, at the roofline step time."""
    return self.per_device_batch / self.step_seconds

  @property
  def epoch_hours(self) -> float:
    return self.steps_per_epoch * self.step_seconds / 3600

  @property
  def hours(self) -> float:
    return self.steps * self.step_seconds / 3600


@dataclasses.dataclass(frozen=True)
class Plan:
  topology: Topology
  mesh_shape: tuple[int, int]  # (data, fsdp)
  data: str  # the data set whose epochs the hours count
  stages: tuple[StageReport, ...]
  fit: dict[str, int] = dataclasses.field(default_factory=dict)  # stage -> largest batch

  @property
  def hours(self) -> float:
    return sum(s.hours for s in self.stages)

  @property
  def chip_hours(self) -> float:
    return self.hours * self.topology.chips


def make_mesh(topology: Topology, data: int, fsdp: int) -> Mesh:
  """The config's ``(data, fsdp)`` mesh over the topology's devices."""
  return Mesh(device_grid(topology, data, fsdp), sharding.BATCH_AXES,
              axis_types=(AxisType.Auto,) * 2)


def default_batch(config: ml_collections.ConfigDict, devices: int) -> int:
  """The per-device batch a recipe was tuned at: its LSQ gradient batch (the reference's
  per-GPU batch, ``quant.lsq_grad_batch``), else ``batch_size`` shared by the devices."""
  per_gpu = config.model.quant.get("lsq_grad_batch")
  if per_gpu:
    return int(per_gpu)
  if config.batch_size % devices:
    raise UserError(f"batch_size={config.batch_size} does not split over the {devices} "
                    "devices of this topology; pass --per_chip_batch=N.")
  return config.batch_size // devices


def planned_stages(config: ml_collections.ConfigDict, run: stages.Run) -> tuple[str, ...]:
  """The recipe's stages: every stage of the pipeline that has steps to run."""
  return tuple(name for name, stage in stages.STAGES.items()
               if stage.build(config, run).total_steps > 0)


def plan(config: ml_collections.ConfigDict, topology_name: str, *,
         stage_names: Sequence[str] | None = None, per_chip_batch: int | None = None,
         fit: bool = False, log: Callable[[str], None] = lambda _: None) -> Plan:
  """Compiles each stage of ``config`` for ``topology_name`` (e.g. ``'v5e:4x4'``) and
  measures it; ``fit``: also the largest per-device batch that fits each stage."""
  topology = compile_only(topology_name)
  devices = len(topology.devices)
  per_device = default_batch(config, devices) if per_chip_batch is None else per_chip_batch
  if per_device < 1:
    raise UserError(f"--per_chip_batch={per_device} must be at least 1.")
  mesh = make_mesh(topology, config.mesh.data, config.mesh.fsdp)
  run = _abstract_run(config, mesh, per_device * devices)
  names = tuple(stage_names) if stage_names else planned_stages(run.config, run)
  unknown = [n for n in names if n not in stages.STAGES]
  if unknown:
    raise UserError(f"--stages={','.join(names)}: {unknown} not among {tuple(stages.STAGES)}.")
  reports, largest = [], {}
  for name in names:
    log(f"[plan] {name}: compiling for {topology.name} at {per_device} images per device")
    reports.append(compile_stage(config, name, topology, mesh, per_device))
    log(f"[plan] {name}: compiled in {reports[-1].compile_seconds:.0f} s")
    if fit:
      largest[name] = largest_batch(config, name, topology, mesh, reports[-1], log)
  return Plan(topology, (mesh.shape["data"], mesh.shape["fsdp"]), config.data.name,
              tuple(reports), largest)


def _abstract_run(config: ml_collections.ConfigDict, mesh: Mesh, global_batch: int
                  ) -> stages.Run:
  config = copy.deepcopy(config)
  with config.unlocked():
    config.batch_size = global_batch
  sharding.check_batch(global_batch, mesh)
  return stages.Run(config, "", data_lib.describe(config.data), mesh, abstract=True)


def compile_stage(config: ml_collections.ConfigDict, name: str, topology: Topology,
                  mesh: Mesh, per_device: int) -> StageReport:
  """``name``'s train step at ``per_device`` images per device, compiled and measured."""
  devices = len(topology.devices)
  run = _abstract_run(config, mesh, per_device * devices)
  start = time.perf_counter()
  with target.compiling_for("tpu"):
    built = stages.STAGES[name].build(run.config, run)
    products = tuple(explain.products(built.student)) if _quantized(built.student) else ()
    spec = step_lib.create_train_state(built.student, built.tx, mesh, tracking=built.tracking,
                                       min_size=run.config.fsdp_min_size)
    teacher = (None if built.teacher is None else step_lib.place_teacher(
        built.teacher, mesh, run.config.fsdp_min_size, abstract=True))
    train_step = step_lib.make_train_step(spec, built.loss, built.tx, built.schedule,
                                          teacher=teacher)
    batch = sharding.abstract(run.source.train_batch(run.config.batch_size),
                              _batch_shardings(run.source, mesh))
    args = (spec.abstract, batch) + (() if teacher is None else (teacher.state,))
    traced = train_step.trace(*args)
    dots = census_lib.census(traced.jaxpr.jaxpr)
    compiled, refused = _compile(traced)
  sharded, replicated = _fsdp_split(spec)
  common = dict(stage=name, per_device_batch=per_device, global_batch=run.config.batch_size,
                capacity=topology.chip.usable_hbm, dots=dots, steps=built.total_steps,
                steps_per_epoch=run.steps_per_epoch, fsdp_sharded=sharded,
                replicated_bytes=replicated, compile_seconds=time.perf_counter() - start,
                products=products)
  if compiled is None:
    return StageReport(memory=program.Memory(0, 0, 0, refused[1], 0), refused=refused[0],
                       **common)
  cost = program.cost(compiled)
  roofline = estimate.roofline(dots, cost["flops"], cost["bytes"], devices, topology)
  return StageReport(memory=program.memory(compiled), flops=cost["flops"],
                     bytes=cost["bytes"], roofline=roofline,
                     utilisation=estimate.utilisation(roofline, topology),
                     collectives=tuple(program.collectives(compiled.as_text())), **common)


def _quantized(model) -> bool:
  return any(getattr(getattr(m, "spec", None), "quantize_weights", False)
             for _, m in nnx.iter_modules(model))


_REFUSALS = (re.compile(r"required for HLO temporaries \(([\d.]+)G\)"),
             re.compile(r"Ran out of memory in memory space hbm\. Used ([\d.]+)G of"))
"""libtpu's two refusals: before buffer assignment (the temporaries alone exceed HBM) and
after code generation (everything together does: ``E1000: CompileTimeHbmOom``)."""


def _compile(traced) -> tuple[Any, tuple[str, int] | None]:
  """``(compiled, None)``, or ``(None, (libtpu's message, the bytes it asked for))`` when
  the program does not fit a device (libtpu refuses to compile it)."""
  try:
    return traced.lower().compile(), None
  except jax.errors.JaxRuntimeError as error:
    return None, refusal(error)


def refusal(error: Exception) -> tuple[str, int]:
  """libtpu's out-of-HBM refusal as ``(its first sentence, bytes needed)``; any other
  error is raised again."""
  text = " ".join(str(error).split())
  needed = [m for m in (p.search(text) for p in _REFUSALS) if m]
  if not text.startswith("RESOURCE_EXHAUSTED") or not needed:
    raise error
  first = text.split(". ")[0] if needed[0].re is _REFUSALS[0] else \
      text[needed[0].start():].split(". Total")[0]
  return first, int(float(needed[0].group(1)) * 2 ** 30)


def _batch_shardings(source: data_lib.DataShape, mesh: Mesh) -> dict[str, Any]:
  return {key: sharding.batch_sharding(mesh) for key in source.train_batch(1)}


def _fsdp_split(spec: step_lib.StateSpec) -> tuple[tuple[tuple[str, int], ...], int]:
  """Parameters whose sharding uses the fsdp axis, with their bytes; the rest's bytes."""
  from ofq_jax.paths import dotted, state_path  # pylint: disable=import-outside-toplevel
  sharded, replicated = [], 0
  leaves = jax.tree_util.tree_flatten_with_path(spec.abstract["params"])[0]
  for path, leaf in leaves:
    size = math.prod(leaf.shape) * leaf.dtype.itemsize
    if "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec)):
      sharded.append((dotted(state_path(path)), size))
    else:
      replicated += size
  return tuple(sharded), replicated


def largest_batch(config: ml_collections.ConfigDict, name: str, topology: Topology,
                  mesh: Mesh, first: StageReport, log: Callable[[str], None],
                  compiles: int = 6) -> int:
  """The largest per-device batch whose step fits a device's HBM (0: not even one), in at
  most ``compiles`` more compiles.

  HBM grows about linearly with the batch: the line through two batches gives a first
  guess; then the line through the nearest batches known to fit and not to fit (regula
  falsi, halving when it stalls) closes the bracket to neighbours."""
  capacity = first.capacity
  at = {first.per_device_batch: first.memory.total}

  def total(batch: int) -> int:
    if batch not in at:
      log(f"[plan] {name}: --fit compiles at {batch} images per device")
      at[batch] = compile_stage(config, name, topology, mesh, batch).memory.total
    return at[batch]

  b0 = first.per_device_batch
  b1 = 2 * b0 if first.fits else max(1, b0 // 2)
  if b1 != b0:
    total(b1)
  for _ in range(compiles):
    fitting = [b for b, t in at.items() if t <= capacity]
    over = [b for b, t in at.items() if t > capacity]
    lo, hi = max(fitting, default=0), min(over, default=None)
    if hi is not None and hi - lo <= 1:
      return lo
    (x0, y0), (x1, y1) = _line_points(at, lo, hi)
    slope = max((y1 - y0) / (x1 - x0), 1.0)
    guess = int(x0 + (capacity - y0) // slope)
    if hi is None:  # above the largest that fits, at least its neighbour
      guess = max(guess, lo + 1)
    elif not lo < guess < hi:
      guess = (lo + hi) // 2
    total(guess)
  return max((b for b, t in at.items() if t <= capacity), default=0)


def _line_points(at: dict[int, int], lo: int, hi: int | None
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
  """The two measured batches a guess extrapolates from: the bracket when there is one,
  else the two largest that fit."""
  if hi is not None and lo in at:
    return (lo, at[lo]), (hi, at[hi])
  known = sorted(at)
  if hi is not None:  # nothing fits yet: the two smallest
    return (known[0], at[known[0]]), (known[1], at[known[1]])
  return (known[-2], at[known[-2]]), (known[-1], at[known[-1]])
