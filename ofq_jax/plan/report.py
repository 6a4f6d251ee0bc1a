"""A plan as a table for people and as JSON for scripts (the same numbers)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from ofq_jax.plan.census import KINDS
from ofq_jax.plan.planner import Plan, StageReport

GB = 1e9


def as_dict(plan: Plan) -> dict[str, Any]:
  """Everything ``as_text`` prints, unrounded; bytes in bytes, times in seconds."""
  topology = plan.topology
  return {
      "topology": topology.name, "chip": topology.chip.name,
      "device_kind": topology.devices[0].device_kind, "devices": len(topology.devices),
      "chips": topology.chips, "hosts": topology.hosts, "slices": topology.slices,
      "mesh": {"data": plan.mesh_shape[0], "fsdp": plan.mesh_shape[1]}, "data": plan.data,
      "stages": [_stage_dict(s) for s in plan.stages],
      "fit": plan.fit, "hours": plan.hours, "chip_hours": plan.chip_hours,
  }


def _stage_dict(s: StageReport) -> dict[str, Any]:
  dots = {owner: {kind: s.dots.total(owner, kind) / s.global_batch for kind in KINDS
                  if s.dots.total(owner, kind)} for owner in ("student", "teacher")}
  r = s.roofline
  return {
      "stage": s.stage, "per_device_batch": s.per_device_batch,
      "global_batch": s.global_batch, "refused": s.refused,
      "memory": {**dataclasses.asdict(s.memory), "total": s.memory.total,
                 "capacity": s.capacity, "fits": s.fits},
      "flops_per_image": s.flops / s.per_device_batch,
      "bytes_per_image": s.bytes / s.per_device_batch,
      "dot_flops_per_image": dots,
      "student_int8_share": s.dots.share("int8"),
      "roofline": None if r is None else {
          "matrix_seconds": r.matrix_seconds, "memory_seconds": r.memory_seconds,
          "step_seconds": r.step_seconds, "bound": r.bound, "utilisation": s.utilisation},
      "images_per_second_per_device": s.images_per_second,
      "steps": s.steps, "steps_per_epoch": s.steps_per_epoch,
      "epoch_hours": s.epoch_hours, "hours": s.hours,
      "collectives": [dataclasses.asdict(c) for c in s.collectives],
      "fsdp_sharded": [{"param": p, "bytes": b} for p, b in s.fsdp_sharded],
      "replicated_param_bytes": s.replicated_bytes,
      "compile_seconds": s.compile_seconds,
      "products": [{"product": d.product, "integer": d.plan is not None, "path": d.path}
                   for d in s.products],
  }


def as_text(plan: Plan, title: str = "") -> str:
  t = plan.topology
  lines = [f"plan{' of ' + title if title else ''} for {t.name}: {t.chips} x "
           f"{t.devices[0].device_kind} ({len(t.devices)} devices, {t.hosts} "
           f"host{'s' if t.hosts > 1 else ''}"
           f"{f', {t.slices} slices' if t.slices > 1 else ''}), mesh data={plan.mesh_shape[0]}"
           f" x fsdp={plan.mesh_shape[1]}"]
  for s in plan.stages:
    lines += [""] + _stage_lines(s, t.chips, plan.data)
    if s.stage in plan.fit:
      lines.append(f"  --fit             the largest batch that fits: {plan.fit[s.stage]} "
                   "images per device")
  lines += ["", f"recipe: {' + '.join(s.stage for s in plan.stages)} = {plan.hours:,.1f} h on "
                f"{t.chips} chips = {plan.chip_hours:,.0f} chip-hours (roofline floor)"]
  return "\n".join(lines)


def _stage_lines(s: StageReport, chips: int, data: str) -> list[str]:
  m, per = s.memory, s.per_device_batch
  head = (f"stage {s.stage}: {per} images per device (global batch {s.global_batch}), "
          f"{s.steps:,} steps ({s.steps_per_epoch:,} per epoch)")
  if s.refused:
    return [head, f"  HBM per device    DOES NOT FIT: {s.refused} (libtpu refused to compile "
                  "it; --fit finds a batch that fits)",
            f"  compile           {s.compile_seconds:.0f} s on this host"]
  student = ", ".join(f"{k} {100 * s.dots.share(k):.1f} %" for k in KINDS
                      if s.dots.total("student", k))
  teacher = ", ".join(f"{k} {s.dots.total('teacher', k) / s.global_batch / 1e9:.1f}"
                      for k in KINDS if s.dots.total("teacher", k))
  r = s.roofline
  return [
      head,
      f"  HBM per device    arguments {m.arguments / GB:.2f} + outputs {m.outputs / GB:.2f} "
      f"- aliased {m.aliased / GB:.2f} + temporaries {m.temporaries / GB:.2f} = "
      f"{m.total / GB:.2f} GB of {s.capacity / GB:.2f}: "
      f"{'fits' if s.fits else 'DOES NOT FIT'} ({100 * m.total / s.capacity:.0f} %)",
      f"  per image         {s.flops / per / 1e9:.3g} GFLOP, {s.bytes / per / GB:.3g} GB of HBM "
      "traffic (XLA's cost analysis)",
      f"  student dots      {student} of {s.dots.total('student') / s.global_batch / 1e9:.1f} "
      "GFLOP per image",
      f"  teacher dots      {teacher or 'none'} GFLOP per image",
      f"  integer products  {_products(s)}",
      f"  roofline          matrix units {1e3 * r.matrix_seconds:.1f} ms, HBM "
      f"{1e3 * r.memory_seconds:.1f} ms: {1e3 * r.step_seconds:.1f} ms per step "
      f"({r.bound}-bound), {s.images_per_second:,.0f} images/s per device, "
      f"utilisation {100 * s.utilisation:.1f} %",
      f"  time              {s.epoch_hours:.2f} h per {data} epoch; the stage {s.hours:,.1f} "
      f"h = {s.hours * chips:,.0f} chip-hours",
      f"  collectives       {_collectives(s)}",
      f"  fsdp              {_fsdp(s)}",
      f"  compile           {s.compile_seconds:.0f} s on this host",
  ]


def _products(s: StageReport) -> str:
  """How many of the student's products run on integer levels; the others by reason."""
  if not s.products:
    return "none (a float student)"
  fake: dict[str, list[str]] = collections.defaultdict(list)
  for d in s.products:
    if d.plan is None:
      fake[d.why].append(d.product)
  on_integers = len(s.products) - sum(len(v) for v in fake.values())
  listed = "; ".join(f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
                     f" ({why})" for why, names in fake.items())
  return (f"{on_integers} of {len(s.products)} on integer levels"
          + (f"; fake-quant: {listed}" if listed else "") + " (--json lists each)")


def _collectives(s: StageReport) -> str:
  if not s.collectives:
    return "none"
  by_kind: dict[str, list[int]] = collections.defaultdict(list)
  for c in s.collectives:
    by_kind[c.kind].append(c.bytes)
  parts = [f"{k} x{len(v)} {sum(v) / 1e6:,.1f} MB" for k, v in sorted(by_kind.items())]
  return "; ".join(parts) + " per step and device (--json lists each)"


def _fsdp(s: StageReport) -> str:
  sharded = sum(b for _, b in s.fsdp_sharded)
  if not s.fsdp_sharded:
    return f"no parameter sharded; {s.replicated_bytes / 1e6:,.1f} MB replicated on every device"
  return (f"{len(s.fsdp_sharded)} parameters sharded ({sharded / 1e6:,.1f} MB, e.g. "
          f"{s.fsdp_sharded[0][0]}), {s.replicated_bytes / 1e6:,.1f} MB replicated")
