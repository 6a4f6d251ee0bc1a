"""The device mesh (data x fsdp axes) and the shardings of batches and parameters."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ofq_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")
"""Batches are split over both axes: fsdp is data parallel too, with sharded state."""


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """A ``(data, fsdp)`` mesh; ``data=-1`` takes all devices that ``fsdp`` leaves.

  A smaller explicit mesh (single process only) uses the first ``data * fsdp``
  devices, e.g. ``data=1`` for a one-device reference run.
  """
  total = jax.device_count()
  if fsdp < 1 or total % fsdp:
    raise UserError(f"mesh.fsdp={fsdp} must be a positive divisor of the {total} devices.")
  if data == -1:
    data = total // fsdp
  size = data * fsdp
  if data < 1 or size > total or (size < total and jax.process_count() > 1):
    raise UserError(f"mesh.data={data} x mesh.fsdp={fsdp} = {size} devices, but {total} are "
                     "present; set mesh.data=-1 to use them all.")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:size])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise UserError(f"{what}={global_batch} is not divisible by the {shards} batch shards "
                     f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); choose a "
                     f"multiple of {shards}.")
  if global_batch % jax.process_count():
    raise UserError(f"{what}={global_batch} is not divisible by the "
                     f"{jax.process_count()} processes.")


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """Shards the largest axis divisible by ``fsdp`` over 'fsdp'; small arrays replicate."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(tree: Any, mesh: Mesh, min_size: int = 2 ** 12) -> Any:
  """NamedShardings for a pytree of arrays (params, optimizer state) by the fsdp rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)),
                      tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local batch pieces -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def place(tree: Any, shardings: Any) -> Any:
  """Host values (identical on every process) -> global arrays with ``shardings``."""
  def put(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


def abstract(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct``s of ``tree`` carrying ``shardings`` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def to_host(tree: Any) -> Any:
  """Fully replicated, process-local numpy copies of (possibly sharded) arrays."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(_replicate(x))), tree)


def _replicate(x: Any) -> Any:
  if isinstance(x, jax.Array) and not x.is_fully_replicated:
    return jax.jit(lambda y: y, out_shardings=replicated(x.sharding.mesh))(x)
  return x
