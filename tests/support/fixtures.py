"""The reference's numeric fixtures (``../shared/fixtures``): discovery, loading, and the
parity measures with their worst-case report."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from support import REPO

FIXTURES = pathlib.Path(os.environ.get("OFQ_FIXTURES", REPO.parent / "shared" / "fixtures"))


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
SWIN_FIXTURES = fixture_names("swin")


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

  def config(self, matmul: str = "fake"):
    from ofq_jax.models import model_config  # pylint: disable=import-outside-toplevel
    meta = self.meta
    variant = meta["variant"]
    return model_config(
        None, embed_dim=meta["embed_dim"], depth=meta["depth"], num_heads=meta["num_heads"],
        num_classes=meta["num_classes"], img_size=meta["img_size"], patch_size=meta["patch"],
        distilled=meta["distilled"],
        quant=dict(enabled=True, weight_bits=meta["bits"], act_bits=meta["bits"],
                   weight_method="lsq" if variant == "lsq" else "statsq",
                   attention="qkr" if variant == "qkr" else "standard",
                   matmul=matmul))


class SwinFixture(DeitFixture):
  """One ``swin_*`` fixture (``../shared/fixtures/SWIN.md``): arrays, grouped, and config."""

  def config(self, matmul: str = "fake"):
    from ofq_jax.models import swin  # pylint: disable=import-outside-toplevel
    model = self.meta["model"]
    assert model["window_size"][0] == model["window_size"][1], model["window_size"]
    return swin.model_config(
        None, embed_dim=model["embed_dim"], depths=tuple(model["depths"]),
        num_heads=tuple(model["num_heads"]), window_size=model["window_size"][0],
        patch_size=model["patch_size"][0], img_size=model["img_size"],
        num_classes=model["num_classes"], layer_norm_eps=model["layer_norm_eps"],
        quant=dict(enabled=True, weight_bits=self.meta["bits"], act_bits=self.meta["bits"],
                   attention="qkr" if self.meta["variant"] == "qkr" else "standard",
                   matmul=matmul))


def array_group(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """``{key without 'prefix/': array}`` for the keys under ``prefix/``."""
  n = len(prefix) + 1
  return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


class QuantizerFixture(dict):
  """One ``quantizers_*`` fixture: ``{key: array}`` with its file's ``name``."""

  def __init__(self, name: str):
    with np.load(fixture_path(name + ".npz")) as data:
      super().__init__({k: data[k] for k in data.files})
    self.name = name


# Worst measured difference per (tier, quantity) over the session: with OFQ_PARITY_REPORT=FILE
# the parity tiers write them to FILE as JSON and print a table (for regenerated fixtures).
PARITY_WORST: dict[tuple[str, str], tuple[float, str]] = {}


def check_parity(tier: str, quantity: str, where: str, value: float, tol: float) -> None:
  """Asserts ``value <= tol`` and keeps the worst ``value`` seen for the report."""
  key = (tier, quantity)
  if key not in PARITY_WORST or value > PARITY_WORST[key][0]:
    PARITY_WORST[key] = (value, where)
  assert value <= tol, f"{tier} {quantity} at {where}: {value:.3g} > {tol:g}"


def max_rel_diff(actual, expected) -> float:
  """max |a - e| / max |e| (the issue's tolerance measure)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  return float(np.max(np.abs(actual - expected))) / scale


@pytest.fixture(autouse=True, scope="module")
def x64_for_this_module():
  """Float64 for the importing test module only (the float64 parity tiers): x64 on, and
  JAX's caches cleared on both sides so that nothing compiled in one mode leaks."""
  jax.clear_caches()
  with jax.enable_x64(True):
    yield
  jax.clear_caches()
