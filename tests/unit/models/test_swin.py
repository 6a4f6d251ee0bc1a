"""The float Swin against the reference's float Swin on every public Swin fixture
(``fp/`` torchvision-named weights -> ``fp_logits``; SWIN.md 1.1: torchvision's own logits
differ from those by at most 5e-7), the torchvision name mapping both ways, the window
helpers against formulas derived from SWIN.md section 3, and the config checks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ofq_jax import interop
from ofq_jax.errors import UserError
from ofq_jax.interop import CheckpointMismatchError
from ofq_jax.models import swin
from support.fixtures import SWIN_FIXTURES, SwinFixture, max_rel_diff


@pytest.fixture(scope="module", params=SWIN_FIXTURES)
def fixture(request):
  return SwinFixture(request.param)


def test_float_logits_equal_the_reference(fixture):
  model = interop.load_torchvision_swin(fixture.group("fp"), fixture.config())
  logits = np.asarray(model(jnp.asarray(fixture.images("x_eval")), train=False))
  assert max_rel_diff(logits, fixture.arrays["fp_logits"]) < 1e-5
  np.testing.assert_allclose(logits, fixture.arrays["fp_logits"], atol=2e-5)


def test_export_round_trips_to_torchvision_names(fixture):
  state = fixture.group("fp")
  model = interop.load_torchvision_swin(state, fixture.config())
  exported = interop.export_torchvision_swin(model)
  assert set(exported) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_mismatching_checkpoint_lists_every_key():
  fixture = SwinFixture(SWIN_FIXTURES[0])
  state = dict(fixture.group("fp"))
  state.pop("features.0.2.weight")
  state["features.1.0.mlp.0.weight"] = state["features.1.0.mlp.0.weight"][:, :3]
  state["extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(CheckpointMismatchError) as error:
    interop.load_torchvision_swin(state, fixture.config())
  text = str(error.value)
  for needle in ("missing    features.0.2.weight", "mis-shaped features.1.0.mlp.0.weight",
                 "unexpected extra.weight", "window_size"):
    assert needle in text
  bad_index = dict(fixture.group("fp"))
  bad_index["features.1.1.attn.relative_position_index"] = \
      bad_index["features.1.1.attn.relative_position_index"][::-1].copy()
  with pytest.raises(CheckpointMismatchError, match="not the relative_position_index this config derives"):
    interop.load_torchvision_swin(bad_index, fixture.config())


def test_position_index_and_shift_mask_follow_their_formulas():
  m = 3
  index = swin.relative_position_index(m)
  for i in range(m * m):
    for j in range(m * m):
      (ri, ci), (rj, cj) = divmod(i, m), divmod(j, m)
      assert index[i, j] == (ri - rj + m - 1) * (2 * m - 1) + (ci - cj + m - 1)
  mask = swin.shift_mask(6, 6, m, (1, 1))  # 4 windows; regions cut at rows/cols 3 and 5
  region = lambda r, c: (0 if r < 3 else 1 if r < 5 else 2) * 3 + (0 if c < 3 else 1 if c < 5 else 2)
  for w in range(4):
    wr, wc = divmod(w, 2)
    cells = [(wr * m + t // m, wc * m + t % m) for t in range(m * m)]
    for i, a in enumerate(cells):
      for j, b in enumerate(cells):
        assert mask[w, i, j] == (0.0 if region(*a) == region(*b) else swin.MASKED)


def test_config_errors_name_the_field():
  with pytest.raises(UserError, match="num_heads"):
    swin.create_model(swin.model_config(None, embed_dim=10, depths=(1,), num_heads=(3,)))
  with pytest.raises(UserError, match="drop_path"):
    swin.create_model(swin.model_config("tiny", drop_path=1.0))
  with pytest.raises(KeyError, match="depth"):
    swin.model_config("tiny", depth=3)
  assert swin.model_config("tiny").depths == (2, 2, 6, 2)


def test_quantize_from_float_copies_and_redraws_as_the_reference(fixture):
  """Against ``precalib/`` (the reference's quantized Swin built from ``fp/``, SWIN.md 5):
  copied entries equal; attn.proj (and qkv in the statsq variant) re-drawn within torch's
  U(+-1/sqrt(in)), position tables re-drawn near N(0, 0.02^2), a random reduction bias."""
  config = fixture.config()
  quantized = interop.quantize_from_float(
      interop.load_torchvision_swin(fixture.group("fp"), config), config, seed=3)
  ours = interop.export_ofq_torch(quantized)
  ref = fixture.group("precalib")
  assert set(ref) == {k for k in ours if not k.endswith(".s")}
  redrawn = (".attn.proj.weight", ".attn.proj.bias", ".relative_position_bias_table",
             ".reduction.bias") + ((".attn.qkv.weight", ".attn.qkv.bias")
                                   if fixture.meta["variant"] != "qkr" else ())
  for key, value in ref.items():
    if key.endswith(redrawn):
      assert not np.array_equal(ours[key], value), key
      if key.endswith("relative_position_bias_table"):
        assert np.max(np.abs(ours[key])) < 0.2, key
      else:
        fan_in = ours[key.replace(".bias", ".weight")].shape[-1] if key.endswith(".bias") \
            else value.shape[-1]
        assert np.max(np.abs(ours[key])) <= 1 / np.sqrt(fan_in) + 1e-7, key
    else:
      np.testing.assert_array_equal(ours[key], value, err_msg=key)
