"""Packed integer export (ofq_jax.export): packing, the file's contents, and logits equal
to the fake-quant model's on the reference fixtures."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ofq_jax import export
from ofq_jax.errors import UserError
from ofq_jax.interop import load_ofq_torch
from ofq_jax.models import create_model, model_config


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2 ** bits, size=1001).astype(np.uint8)
  packed = export.pack(codes, bits)
  assert packed.size == -(-codes.size // export.CODES_PER_BYTE.get(bits, 1))
  np.testing.assert_array_equal(export.unpack(packed, bits, codes.size), codes)


def test_packed_model_equals_the_fake_quant_model(deit_fixture, tmp_path):
  """Fixture weights -> packed file -> jitted integer forward: eval logits equal the
  fake-quant model's to 1e-5; the file holds codes and units, no latent weight."""
  config = deit_fixture.config()
  model = load_ofq_torch(deit_fixture.group("q"), config)
  path = tmp_path / "model.safetensors"
  sizes = export.export_integer(model, path)
  images = jnp.asarray(deit_fixture.images("x_eval"))
  logits = export.load_integer(path, config)(images)
  np.testing.assert_allclose(logits, model(images, train=False), rtol=0, atol=1e-5)
  with safe_open(str(path), framework="numpy") as f:
    keys = set(f.keys())
    layout = json.loads(f.metadata()["layout"])
  assert sizes["bytes"] == path.stat().st_size
  for name in layout:  # every rounded tensor: its codes and unit, never its float value
    assert {f"{name}.codes", f"{name}.unit"} <= keys and name not in keys
  for block in range(deit_fixture.meta["depth"]):
    assert f"blocks.{block}.mlp.fc1.kernel" not in keys
    assert f"blocks.{block}.attn.q_kernel" not in keys  # QKR's W_q / W_k neither
    assert f"blocks.{block}.norm1.scale" in keys


def test_load_refuses_other_formats_and_models(tmp_path, deit_fixture):
  config = deit_fixture.config()
  path = tmp_path / "model.safetensors"
  export.export_integer(load_ofq_torch(deit_fixture.group("q"), config), path)
  other = model_config(None, embed_dim=config.embed_dim, depth=config.depth + 1,
                       num_heads=config.num_heads, num_classes=config.num_classes,
                       img_size=config.img_size, patch_size=config.patch_size,
                       quant=config.quant.to_dict())
  with pytest.raises(UserError, match=r"holds another model: depth: \d+ stored, \d+ asked"):
    export.load_integer(path, other)
  save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "old.safetensors"),
            metadata={"format": "ofq_jax.packed-integer/0"})
  with pytest.raises(UserError, match="format 'ofq_jax.packed-integer/0'.*re-export"):
    export.load_integer(tmp_path / "old.safetensors")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.load_integer(tmp_path / "missing.safetensors")
  with pytest.raises(UserError, match="rounds no tensor"):
    export.export_integer(create_model(model_config(None, embed_dim=32, depth=1, num_heads=2,
                                                    img_size=16, patch_size=8)), path)


def test_packed_files_are_told_by_their_metadata_not_their_name(tmp_path, deit_fixture):
  """``evaluate`` routes a checkpoint by ``is_packed_file``: whatever its suffix, a file
  this exporter wrote is packed; other safetensors, npz files and directories are not."""
  path = tmp_path / "model.bin"
  export.export_integer(load_ofq_torch(deit_fixture.group("q"), deit_fixture.config()), path)
  assert export.is_packed_file(path)
  save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
  np.savez(tmp_path / "plain.npz", x=np.zeros(3))
  assert not any(export.is_packed_file(tmp_path / name)
                 for name in ("plain.safetensors", "plain.npz", "missing.safetensors", "."))
