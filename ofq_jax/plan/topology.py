"""A TPU topology by name, as compile-only devices (no TPU needed, only libtpu).

``--topology=v5e:4x4`` is what libtpu calls a slice: a chip generation, then the chips
along each axis; ``2xv5e:4x4`` is two such slices joined over the data-centre network
(multislice). A CPU host compiles for it through ``jax.experimental.topologies``.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from ofq_jax import target
from ofq_jax.errors import UserError
from ofq_jax.plan.chips import CHIPS, Chip

INSTALL = 'pip install "ofq_jax[tpu]"'
_NO_POD = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1",
           "TPU_ACCELERATOR_TYPE": "v5litepod-4"}
"""What libtpu would ask a TPU VM's metadata for; the topology name decides the rest."""
_NAME = re.compile(r"^(?:(\d+)x)?([a-z0-9]+):(\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Topology:
  """Compile-only devices of a named slice (or slices) and the chip they are."""
  name: str
  chip: Chip
  devices: tuple  # jax compile-only devices, slice-major
  slices: int
  hosts: int
  devices_per_chip: int  # v4 compiles per TensorCore: two devices a chip

  @property
  def chips(self) -> int:
    return len(self.devices) // self.devices_per_chip

  def per_device(self, value: float) -> float:
    """A per-chip figure (rates, HBM) as each device sees it."""
    return value / self.devices_per_chip


def parse(name: str) -> tuple[int, Chip, str]:
  """``(slices, chip, libtpu's name)`` of ``[Nx]<chip>:<shape>``, or a UserError."""
  match = _NAME.match(name.strip().lower())
  known = ", ".join(sorted(CHIPS))
  if not match:
    raise UserError(f"--topology={name!r} is not <chip>:<shape> or <slices>x<chip>:<shape>; "
                    f"e.g. v5e:4x4, v5p:2x2x2 or 2xv5e:4x4 (chips: {known}).")
  slices, chip, shape = int(match.group(1) or 1), match.group(2), match.group(3)
  if chip not in CHIPS:
    raise UserError(f"--topology={name!r}: unknown chip {chip!r}; use one of {known}.")
  if slices < 1:
    raise UserError(f"--topology={name!r}: the number of slices must be at least 1.")
  return slices, CHIPS[chip], f"{chip}:{shape}"


def compile_only(name: str) -> Topology:
  """The topology ``name`` names, as compile-only devices; one ``UserError`` line for a
  missing libtpu or a shape libtpu refuses."""
  slices, chip, libtpu_name = parse(name)
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UserError(f"--topology={name!r} needs libtpu, the TPU compiler (no TPU needed): "
                    f"{INSTALL}") from None
  # A second process (a parallel test worker, a plan beside a plan) may compile too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not target.tpu_chips_present():  # libtpu then looks for a pod it is not on, loudly
    for key, value in _NO_POD.items():
      os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"num_slices": slices} if slices > 1 else {}
  try:
    devices = topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu",
                                           **kwargs).devices
  except Exception as error:  # pylint: disable=broad-except
    reason = " ".join(str(error).split()).split("=== Source Location")[0]
    raise UserError(f"--topology={name!r}: libtpu refuses it ({reason}); see the slice shapes "
                    f"of {chip.source}.") from None
  devices = tuple(sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id)))
  per_chip = len({getattr(d, "core_on_chip", 0) for d in devices})
  hosts = len({(getattr(d, "slice_index", 0), d.process_index) for d in devices})
  return Topology(name, chip, devices, slices, hosts, per_chip)


def device_grid(topology: Topology, data: int, fsdp: int) -> np.ndarray:
  """The devices as a ``(data, fsdp)`` grid: fsdp neighbours within a slice (its
  all-gathers stay on the chips' own links), slices along data."""
  total = len(topology.devices)
  if fsdp < 1 or total % fsdp or (total // topology.slices) % fsdp:
    raise UserError(f"mesh.fsdp={fsdp} must divide the {total // topology.slices} devices of "
                    f"each slice of {topology.name}.")
  if data == -1:
    data = total // fsdp
  if data * fsdp != total:
    raise UserError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but "
                    f"{topology.name} has {total}; set mesh.data=-1 to use them all.")
  return np.array(topology.devices, dtype=object).reshape(data, fsdp)
