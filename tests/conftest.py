"""Test setup: 8 fake CPU devices (set before jax is imported) and the fixtures."""

import json
import os
import pathlib

# 8 fake CPU devices; optimization level 0 because the suite's tiny models spend far
# more time compiling than running (subprocess tests inherit both).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("OFQ_FIXTURES", REPO.parent / "shared" / "fixtures"))


def pytest_configure(config):
  config.addinivalue_line("markers", "x64: runs with jax_enable_x64 on (the float64 parity "
                          "tier); every other test asserts that x64 is off")


def fixture_names(family: str) -> list[str]:
  """Every ``<family>_*.npz`` in the fixtures folder (a new file is tested by dropping it in)."""
  names = sorted(p.stem for p in FIXTURES.glob(f"{family}_*.npz"))
  if not names:
    raise FileNotFoundError(
        f"No {family}_*.npz reference fixture in {FIXTURES}. The parity tests need "
        "../shared/fixtures beside the checkout, or OFQ_FIXTURES pointing at a folder of them.")
  return names


DEIT_FIXTURES = fixture_names("deit")
QUANTIZER_FIXTURES = fixture_names("quantizers")


def fixture_path(name: str) -> pathlib.Path:
  path = FIXTURES / name
  if not path.exists():
    raise FileNotFoundError(
        f"Reference fixture {path} is missing. The parity tests need ../shared/fixtures "
        "beside the checkout, or OFQ_FIXTURES pointing at that folder.")
  return path


class DeitFixture:
  """One ``deit_*`` fixture: its arrays, grouped by prefix, and its model config."""

  def __init__(self, name: str):
    self.name = name
    with np.load(fixture_path(name + ".npz")) as data:
      self.arrays = {k: data[k] for k in data.files}
    self.meta = json.loads(fixture_path(name + ".json").read_text())

  def group(self, prefix: str) -> dict[str, np.ndarray]:
    return array_group(self.arrays, prefix)

  def images(self, key: str, dtype=np.float32) -> np.ndarray:
    """NCHW fixture images as NHWC (float64: the exact cast of the float32 pixels)."""
    return np.ascontiguousarray(self.arrays[key].transpose(0, 2, 3, 1)).astype(dtype)

  def config(self):
    from ofq_jax.models import model_config  # pylint: disable=import-outside-toplevel
    meta = self.meta
    variant = meta["variant"]
    return model_config(
        None, embed_dim=meta["embed_dim"], depth=meta["depth"], num_heads=meta["num_heads"],
        num_classes=meta["num_classes"], img_size=meta["img_size"], patch_size=meta["patch"],
        distilled=meta["distilled"],
        quant=dict(enabled=True, weight_bits=meta["bits"], act_bits=meta["bits"],
                   weight_method="lsq" if variant == "lsq" else "statsq",
                   attention="qkr" if variant == "qkr" else "standard"))


def array_group(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """``{key without 'prefix/': array}`` for the keys under ``prefix/``."""
  n = len(prefix) + 1
  return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


_CACHE: dict[str, DeitFixture] = {}


@pytest.fixture(params=DEIT_FIXTURES, scope="session")
def deit_fixture(request) -> DeitFixture:
  if request.param not in _CACHE:
    _CACHE[request.param] = DeitFixture(request.param)
  return _CACHE[request.param]


class QuantizerFixture(dict):
  """One ``quantizers_*`` fixture: ``{key: array}`` with its file's ``name``."""

  def __init__(self, name: str):
    with np.load(fixture_path(name + ".npz")) as data:
      super().__init__({k: data[k] for k in data.files})
    self.name = name


@pytest.fixture(params=QUANTIZER_FIXTURES, scope="session")
def quantizer_fixture(request) -> QuantizerFixture:
  return QuantizerFixture(request.param)


@pytest.fixture(autouse=True)
def _float32_unless_marked_x64(request):
  """Guards the float64 tier's isolation: no other test may run with x64 on."""
  from ofq_jax.compat import x64_enabled  # pylint: disable=import-outside-toplevel
  if request.node.get_closest_marker("x64") is None:
    assert not x64_enabled(), "jax_enable_x64 leaked into a float32 test"
  yield


# Worst measured difference per (tier, quantity) over the session: with OFQ_PARITY_REPORT=FILE
# the parity tiers write them to FILE as JSON and print a table (for regenerated fixtures).
_PARITY_WORST: dict[tuple[str, str], tuple[float, str]] = {}


def check_parity(tier: str, quantity: str, where: str, value: float, tol: float) -> None:
  """Asserts ``value <= tol`` and keeps the worst ``value`` seen for the report."""
  key = (tier, quantity)
  if key not in _PARITY_WORST or value > _PARITY_WORST[key][0]:
    _PARITY_WORST[key] = (value, where)
  assert value <= tol, f"{tier} {quantity} at {where}: {value:.3g} > {tol:g}"


def pytest_terminal_summary(terminalreporter):
  path = os.environ.get("OFQ_PARITY_REPORT")
  if not path or not _PARITY_WORST:
    return
  rows = [dict(tier=t, quantity=q, worst=v, where=w)
          for (t, q), (v, w) in sorted(_PARITY_WORST.items())]
  pathlib.Path(path).write_text(json.dumps(dict(fixtures=str(FIXTURES), rows=rows), indent=1))
  terminalreporter.write_line(f"parity: worst differences over {FIXTURES} -> {path}")
  for r in rows:
    terminalreporter.write_line(f"  {r['tier']:4} {r['quantity']:34} {r['worst']:10.3g}  "
                                f"{r['where']}")


def set_fields(config, values: dict):
  """Assigns ``{"a.b.c": value}`` into a nested ConfigDict; returns it."""
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def max_rel_diff(actual, expected) -> float:
  """max |a - e| / max |e| (the issue's tolerance measure)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  return float(np.max(np.abs(actual - expected))) / scale
