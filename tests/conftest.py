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
DEIT_FIXTURES = ("deit_qkr_w2a2_seed0", "deit_statsq_w4a4_seed0", "deit_lsq_w3a3_seed0")


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
    n = len(prefix) + 1
    return {k[n:]: v for k, v in self.arrays.items() if k.startswith(prefix + "/")}

  def images(self, key: str) -> np.ndarray:
    """NCHW fixture images as NHWC."""
    return np.ascontiguousarray(self.arrays[key].transpose(0, 2, 3, 1))

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


_CACHE: dict[str, DeitFixture] = {}


@pytest.fixture(params=DEIT_FIXTURES, scope="session")
def deit_fixture(request) -> DeitFixture:
  if request.param not in _CACHE:
    _CACHE[request.param] = DeitFixture(request.param)
  return _CACHE[request.param]


@pytest.fixture(scope="session")
def quantizer_fixture() -> dict[str, np.ndarray]:
  with np.load(fixture_path("quantizers_seed0.npz")) as data:
    return {k: data[k] for k in data.files}


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
