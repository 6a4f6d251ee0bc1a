"""Test setup: 8 fake CPU devices (set before jax is imported), markers, the fixture
parametrization and the float32 guard. Shared helpers live in ``support/``.

``tests/unit`` mirrors the package; ``tests/integration`` (training runs, ImageNet,
notebooks, the ablation) is marked ``slow``: ``pytest -m "not slow"`` is the quick loop.
"""

import json
import os
import pathlib
import shutil
import tempfile

# 8 fake CPU devices; optimization level 0 because the suite's tiny models spend far
# more time compiling than running (subprocess tests inherit both).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, in-process and in the subprocesses
# (training CLIs, notebooks, preemption runs compile the same tiny steps again and
# again); removed at the end of the session.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="ofq_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

from support import fixtures  # noqa: E402

INTEGRATION = pathlib.Path(__file__).resolve().parent / "integration"


def pytest_configure(config):
  config.addinivalue_line("markers", "x64: runs with jax_enable_x64 on (the float64 parity "
                          "tier); every other test asserts that x64 is off")
  config.addinivalue_line("markers", "slow: an integration test (tests/integration): "
                          "training runs, CLIs, ImageNet, notebooks, the ablation")


def pytest_unconfigure(config):
  del config
  if _XLA_CACHE is not None:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
  for item in items:
    if INTEGRATION in pathlib.Path(str(item.fspath)).resolve().parents:
      item.add_marker(pytest.mark.slow)


_CACHE: dict[str, fixtures.DeitFixture] = {}


@pytest.fixture(params=fixtures.DEIT_FIXTURES, scope="session")
def deit_fixture(request) -> fixtures.DeitFixture:
  if request.param not in _CACHE:
    _CACHE[request.param] = fixtures.DeitFixture(request.param)
  return _CACHE[request.param]


@pytest.fixture(params=fixtures.QUANTIZER_FIXTURES, scope="session")
def quantizer_fixture(request) -> fixtures.QuantizerFixture:
  return fixtures.QuantizerFixture(request.param)


@pytest.fixture(params=("fake", "integer"))
def matmul(request) -> str:
  """``model.quant.matmul``: the parity tests of the quantized model hold in both modes."""
  return request.param


@pytest.fixture(autouse=True)
def _float32_unless_marked_x64(request):
  """Guards the float64 tier's isolation: no other test may run with x64 on."""
  from ofq_jax.compat import x64_enabled  # pylint: disable=import-outside-toplevel
  if request.node.get_closest_marker("x64") is None:
    assert not x64_enabled(), "jax_enable_x64 leaked into a float32 test"
  yield


def pytest_terminal_summary(terminalreporter):
  path = os.environ.get("OFQ_PARITY_REPORT")
  if not path or not fixtures.PARITY_WORST:
    return
  rows = [dict(tier=t, quantity=q, worst=v, where=w)
          for (t, q), (v, w) in sorted(fixtures.PARITY_WORST.items())]
  pathlib.Path(path).write_text(json.dumps(dict(fixtures=str(fixtures.FIXTURES), rows=rows),
                                           indent=1))
  terminalreporter.write_line(f"parity: worst differences over {fixtures.FIXTURES} -> {path}")
  for r in rows:
    terminalreporter.write_line(f"  {r['tier']:4} {r['quantity']:34} {r['worst']:10.3g}  "
                                f"{r['where']}")
