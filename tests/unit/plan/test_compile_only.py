"""The pieces of a plan on their own: topologies by name, the chips table, the dot
census and the reading of a compiled TPU program (``ofq_jax.plan``)."""

import builtins
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ofq_jax.errors import UserError
from ofq_jax.plan import census, chips, planner, program, topology
from ofq_jax.step import TEACHER_SCOPE


def test_a_topology_is_its_devices_chips_and_hosts():
  v5e = topology.compile_only("v5e:2x4")
  assert (len(v5e.devices), v5e.chips, v5e.slices) == (8, 8, 1)
  assert v5e.chip.name == "v5e" and v5e.devices[0].device_kind == v5e.chip.device_kind
  v4 = topology.compile_only("v4:2x2x1")  # one device per TensorCore
  assert (len(v4.devices), v4.chips, v4.devices_per_chip) == (8, 4, 2)
  two = topology.compile_only("2xv5e:2x2")
  assert (len(two.devices), two.slices) == (8, 2)
  assert [d.slice_index for d in two.devices] == [0] * 4 + [1] * 4


@pytest.mark.parametrize("name, says", [
    ("v5e", "is not <chip>:<shape>"),
    ("tpu9:2x2", "unknown chip 'tpu9'"),
    ("v5e:3x3", "libtpu refuses it"),
])
def test_a_bad_topology_is_one_error_line(name, says):
  with pytest.raises(UserError, match=says):
    topology.compile_only(name)


def test_a_missing_libtpu_names_the_extra(monkeypatch):
  real_import = builtins.__import__

  def no_libtpu(name, *args, **kwargs):
    if name == "libtpu":
      raise ImportError("No module named 'libtpu'")
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_libtpu)
  with pytest.raises(UserError, match=r'pip install "ofq_jax\[tpu\]"'):
    topology.compile_only("v5e:2x2")


def test_the_mesh_keeps_fsdp_within_a_slice_and_refuses_what_does_not_divide():
  two = topology.compile_only("2xv5e:2x2")
  mesh = planner.make_mesh(two, -1, 2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  for row in mesh.devices:  # fsdp neighbours share a slice
    assert len({d.slice_index for d in row}) == 1
  with pytest.raises(UserError, match="mesh.fsdp=3 must divide"):
    planner.make_mesh(two, -1, 3)
  with pytest.raises(UserError, match="mesh.data=3 x mesh.fsdp=2"):
    planner.make_mesh(two, 3, 2)


@pytest.mark.parametrize("name", sorted(chips.CHIPS))
def test_usable_hbm_is_what_libtpu_allows(name):
  """The table's usable HBM per device equals libtpu's own figure, read off its refusal
  of a program that needs 512 GiB of temporaries."""
  shape = "2x2x1" if name in ("v4", "v5p") else "2x2"
  device = topology.compile_only(f"{name}:{shape}").devices[0]
  mesh = Mesh(np.array([device]), ("x",))
  x = jax.ShapeDtypeStruct((2 ** 20,), jnp.float32, sharding=NamedSharding(mesh, P()))
  traced = jax.jit(lambda v: jnp.cumsum(jnp.broadcast_to(v, (2 ** 17, 2 ** 20)), 0).sum()
                   ).trace(x)
  compiled, refused = planner._compile(traced)  # pylint: disable=protected-access
  assert compiled is None and refused[1] >= 512 * 2 ** 30
  available = float(refused[0].split("available HBM (")[1].split("G)")[0])
  assert chips.CHIPS[name].usable_hbm == int(available * 2 ** 30)


@pytest.mark.parametrize("message,says,needed", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (17.39G) exceeds available HBM (15.75G). More text.",
     "RESOURCE_EXHAUSTED: Ran out of memory on HBM", 17.39),
    ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
     "of memory in memory space hbm. Used 15.77G of 15.75G hbm. Exceeded hbm capacity by "
     "18.70M.\n\nTotal hbm usage >= 16.0G: ...",
     "Ran out of memory in memory space hbm. Used 15.77G of 15.75G hbm", 15.77)])
def test_both_refusals_of_libtpu_are_read(message, says, needed):
  """libtpu refuses before buffer assignment (temporaries alone) or after code generation
  (``CompileTimeHbmOom``, a DeiT-B step at 106 per v5e chip); both are a plan that does
  not fit, with what it asked for. Anything else is raised again."""
  first, asked = planner.refusal(jax.errors.JaxRuntimeError(message))
  assert first.startswith(says) and asked == int(needed * 2 ** 30)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    planner.refusal(jax.errors.JaxRuntimeError("INTERNAL: something else"))


def test_census_counts_each_dot_by_kind_owner_and_repeat():
  """FLOPs from the shapes (``2 M N K`` per dot, derived by hand): a float32 'highest'
  teacher dot, an int8 one, and a default-precision dot in a 3-step scan, each with the
  dots of its gradient."""
  def f(x, w):
    with jax.named_scope(TEACHER_SCOPE):
      teacher = jnp.matmul(x, w, precision="highest")
    ints = jax.lax.dot_general(x.astype(jnp.int8), w.astype(jnp.int8),
                               (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    carry, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)
    return jnp.sum(teacher) + jnp.sum(ints) + jnp.sum(carry)
  x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
  one = 2 * 4 * 8 * 8
  found = census.census(jax.make_jaxpr(jax.grad(f))(x, w).jaxpr)
  assert found.flops == {("teacher", "f32 highest"): 2 * one, ("student", "int8"): one,
                         ("student", "f32 default"): 3 * 2 * one}
  assert found.share("int8") == pytest.approx(1 / 7)


@pytest.mark.parametrize("dtypes, precision, kind", [
    ((jnp.int8, jnp.int8), None, "int8"), ((jnp.bfloat16, jnp.bfloat16), None, "bf16"),
    ((jnp.float32, jnp.float32), None, "f32 default"),
    ((jnp.float32, jnp.float32), (jax.lax.Precision.HIGH,) * 2, "f32 high"),
    ((jnp.float32, jnp.bfloat16), jax.lax.Precision.HIGHEST, "f32 highest"),
])
def test_dot_kinds(dtypes, precision, kind):
  assert census.dot_kind(*dtypes, precision) == kind


def test_a_compiled_program_is_read_as_xla_reports_it():
  """Memory and cost of a v5e:2x2 program are ``memory_analysis()`` / ``cost_analysis()``;
  its collectives have the payloads their shapes give: replicating a weight sharded over
  the four devices gathers it whole, and a sum over the sharded rows all-reduces one row."""
  devices = topology.compile_only("v5e:2x2").devices
  mesh = Mesh(np.array(devices), ("fsdp",))
  replicated = NamedSharding(mesh, P())
  w = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  compiled = jax.jit(lambda w: (w * 2, jnp.sum(w, axis=0)),
                     out_shardings=(replicated, replicated)).lower(w).compile()
  analysis, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = program.memory(compiled)
  assert memory.arguments == analysis.argument_size_in_bytes == 256 * 512 * 4 // 4
  assert memory.total == (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes
                          + analysis.generated_code_size_in_bytes)
  assert program.cost(compiled) == {"flops": cost["flops"], "bytes": cost["bytes accessed"]}
  found = {c.kind: c for c in program.collectives(compiled.as_text())}
  assert found["all-gather"].bytes == 256 * 512 * 4
  assert found["all-reduce"].bytes == 512 * 4
  assert all(c.groups for c in found.values())


def test_array_bytes_reads_tuples_and_scalars():
  assert program.array_bytes("(f32[2,3]{1,0}, bf16[4]{0}, s8[], pred[5])") == 24 + 8 + 1 + 5
  assert math.isclose(program.array_bytes("f32[1000,1000]"), 4e6)
