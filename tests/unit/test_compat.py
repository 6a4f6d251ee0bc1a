"""The supported-version rules of ofq_jax.compat, derived from the packages' metadata:
flax < 0.12.9 imports a jax symbol that jax 0.11.2 renamed."""

import pytest

from ofq_jax import compat


@pytest.mark.parametrize("jax_version,flax_version,ok", [
    ((0, 10, 2), (0, 12, 8), True),    # CI: Python 3.11
    ((0, 11, 1), (0, 12, 8), True),    # the last jax with HiPrimitive
    ((0, 11, 2), (0, 12, 9), True),    # the accelerator image
    ((0, 12, 0), (0, 12, 12), True),   # a current Python 3.12 install
    ((0, 11, 2), (0, 12, 8), False),
    ((0, 12, 0), (0, 12, 8), False),
])
def test_flax_and_jax_pairs(monkeypatch, jax_version, flax_version, ok):
  versions = {"jax": jax_version, "flax": flax_version}
  monkeypatch.setattr(compat, "_version", versions.__getitem__)
  if ok:
    compat.check_versions()
  else:
    with pytest.raises(ImportError, match=r"^error: flax 0\.12\.8 does not work with jax "
                       r"0\.1[12]\.\d.*fix: pip install 'flax>=0\.12\.9,<0\.13'"):
      compat.check_versions()


def test_installed_versions_pass_and_x64_reads_off():
  compat.check_versions()
  assert compat.x64_enabled() is False


def test_shape_dtype_struct_keeps_the_sharding():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.ones((4, 2), jnp.float32)
  s = compat.to_shape_dtype_struct(x)
  assert isinstance(s, jax.ShapeDtypeStruct)
  assert (s.shape, s.dtype, s.sharding) == (x.shape, x.dtype, x.sharding)
