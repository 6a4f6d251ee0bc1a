"""Checkpoint import/export: file formats, state dtypes, clear mismatch errors, and the
float -> quantized construction (checked against the fixtures' precalib/ state).
The exact export round trip of every fixture is in ``test_parity_f32.py``."""

import argparse

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from ofq_jax.interop import (CheckpointMismatchError, export_ofq_torch, export_timm_deit,
                             load_ofq_torch, load_timm_deit, quantize_from_float)
from ofq_jax.models import create_model, model_config
from support.fixtures import DeitFixture


@pytest.fixture(scope="module")
def qkr():
  return DeitFixture("deit_qkr_w2a2_seed0")


def _assert_same_state(a: dict, b: dict):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_file_formats(tmp_path, qkr):
  """npz, safetensors, FB .pth ({'model': ...}) and OFQ .pth.tar ({'state_dict', 'args'})."""
  from safetensors.numpy import save_file
  fp = qkr.group("fp")
  config = qkr.config()
  np.savez(tmp_path / "fp.npz", **fp)
  save_file(fp, str(tmp_path / "fp.safetensors"))
  torch.save({"model": {k: torch.from_numpy(v) for k, v in fp.items()}}, tmp_path / "fb.pth")
  for name in ("fp.npz", "fp.safetensors", "fb.pth"):
    _assert_same_state(export_timm_deit(load_timm_deit(tmp_path / name, config)), fp)

  q = qkr.group("q")
  torch.save({"state_dict": {"module." + k: torch.from_numpy(v) for k, v in q.items()},
              "epoch": 300, "args": argparse.Namespace(model="deit_tiny_distilled")},
             tmp_path / "model_best.pth.tar")
  _assert_same_state(export_ofq_torch(load_ofq_torch(tmp_path / "model_best.pth.tar", config)),
                     q)


def test_missing_file_and_unknown_format(tmp_path, qkr):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_timm_deit(tmp_path / "nope.pth", qkr.config())
  (tmp_path / "weights.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="Unknown checkpoint format"):
    load_timm_deit(tmp_path / "weights.h5", qkr.config())


def test_mismatch_lists_every_offending_key(qkr):
  state = dict(qkr.group("q"))
  del state["blocks.0.mlp.fc1.weight"]
  state["blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  state["head.bias"] = np.zeros((11,), np.float32)
  state["blocks.1.attn.qk_quant.clip_val"] = np.array([2.5], np.float32)
  with pytest.raises(CheckpointMismatchError) as info:
    load_ofq_torch(state, qkr.config())
  message = str(info.value)
  assert "missing    blocks.0.mlp.fc1.weight: expected shape (384, 96)" in message
  assert "unexpected blocks.0.attn.extra.weight: found shape (2, 2)" in message
  assert "mis-shaped head.bias: expected shape (10,), found (11,)" in message
  assert "unsupported blocks.1.attn.qk_quant.clip_val" in message
  assert "4 problem(s)" in message


def test_timm_mismatch_for_wrong_architecture(qkr):
  fp = qkr.group("fp")
  plain = model_config(None, embed_dim=96, depth=2, num_heads=3, num_classes=10,
                       distilled=False)
  with pytest.raises(CheckpointMismatchError) as info:
    load_timm_deit(fp, plain)
  message = str(info.value)
  assert "unexpected dist_token" in message and "unexpected head_dist.weight" in message
  assert "mis-shaped pos_embed: expected shape (1, 197, 96), found (1, 198, 96)" in message


def test_uncalibrated_checkpoints_need_the_flag(qkr):
  with pytest.raises(CheckpointMismatchError, match="missing    .*input_quant_fn.s"):
    load_ofq_torch(qkr.group("precalib"), qkr.config())


def test_export_guards(qkr):
  with pytest.raises(ValueError, match="takes a float model"):
    export_timm_deit(load_ofq_torch(qkr.group("q"), qkr.config()))
  config = qkr.config()
  config.quant.qk_bias = "fold"
  model = quantize_from_float(load_timm_deit(qkr.group("fp"), config), config)
  with pytest.raises(ValueError, match="qk_bias='fold'"):
    export_ofq_torch(model)
  with pytest.raises(ValueError, match="quant.enabled=True"):
    load_ofq_torch(qkr.group("q"), model_config(None, embed_dim=96, depth=2, num_heads=3))


def test_quantize_from_float_matches_reference_construction(deit_fixture):
  """Against precalib/: every copied tensor equal; proj (and qkv of standard attention)
  drawn from torch's default init, as the reference does (spec 3.5, item 7.1)."""
  config = deit_fixture.config()
  fp_state = deit_fixture.group("fp")
  model = quantize_from_float(load_timm_deit(fp_state, config), config, seed=3)
  ours = export_ofq_torch(model)
  precalib = deit_fixture.group("precalib")
  random_parts = (".attn.proj.weight", ".attn.proj.bias", ".attn.qkv.weight", ".attn.qkv.bias")
  random_keys = [k for k in precalib if k.endswith(random_parts)]
  assert random_keys
  for key, expected in precalib.items():
    if key in random_keys:
      bound = 1 / np.sqrt(ours[key].shape[-1] if key.endswith("weight") else config.embed_dim)
      assert np.max(np.abs(ours[key])) <= bound, key
      assert not np.allclose(ours[key], 0), key
    else:
      np.testing.assert_array_equal(ours[key], expected, err_msg=key)
  assert set(ours) - set(precalib) == {k for k in ours if k.endswith(".s")}


def _random_float_model(config, seed: int, scale: float = 0.3):
  """A float model whose every parameter (biases too) is random."""
  model = create_model(config, seed)
  state = nnx.state(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _tiny(**quant):
  return model_config(None, embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32,
                      num_classes=7, quant=quant)


def test_qk_bias_fold_keeps_the_pretrained_attention():
  """With every quantizer off (rules '.*=float') and pretrained proj, QKR + 'fold' is the
  float model exactly (up to float error); 'drop' loses the b_q^T W_k x_j term."""
  float_model = _random_float_model(_tiny(), 0)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  expected = float_model(images)
  outputs = {}
  for qk_bias in ("fold", "drop"):
    config = _tiny(enabled=True, rules=(".*=float",), attn_proj_init="pretrained",
                   qk_bias=qk_bias)
    outputs[qk_bias] = quantize_from_float(float_model, config)(images)
  fold_error = float(np.max(np.abs(outputs["fold"] - expected)))
  drop_error = float(np.max(np.abs(outputs["drop"] - expected)))
  assert fold_error <= 2e-6
  assert drop_error > 100 * fold_error


def test_standard_attention_pretrained_init_is_the_float_model():
  float_model = _random_float_model(_tiny(), 2)
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  config = _tiny(enabled=True, attention="standard", rules=(".*=float",),
                 attn_proj_init="pretrained", attn_qkv_init="pretrained")
  np.testing.assert_allclose(quantize_from_float(float_model, config)(images),
                             float_model(images), rtol=0, atol=1e-5)


def test_loaders_choose_the_state_dtype(qkr):
  """Without x64 a float64 state loads as float32 and an explicit float64 is refused."""
  state64 = {k: v.astype(np.float64) for k, v in qkr.group("q").items()}
  model = load_ofq_torch(state64, qkr.config())
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))}
  assert dtypes == {np.dtype(np.float32)}
  with pytest.raises(ValueError, match="dtype=float64 needs 64-bit JAX.*enable_x64"):
    load_ofq_torch(state64, qkr.config(), dtype=np.float64)
  with pytest.raises(ValueError, match="dtype=int8 is not supported"):
    load_timm_deit(qkr.group("fp"), qkr.config(), dtype=np.int8)
