"""The model-level oscillation tracker: which tensors, their levels, flips and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ofq_jax import sharding
from ofq_jax.models import create_model, model_config
from ofq_jax.models.tracker import (OscillationTracker, quantized_weights, weight_levels,
                                    weight_scale)


def tiny(attention="qkr", weight_method="statsq", bits=2):
  return create_model(model_config(
      None, embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32, num_classes=10,
      quant=dict(enabled=True, attention=attention, weight_method=weight_method,
                 weight_bits=bits, act_bits=bits)))


def modules(model):
  return {tuple(p): m for p, m in nnx.iter_modules(model)}


def test_every_quantized_tensor_is_tracked():
  qkr = [w.name for w in quantized_weights(tiny())]
  assert {"patch_embed.kernel", "head.kernel", "head_dist.kernel"} <= set(qkr)
  for i in range(2):
    for name in ("attn.v_kernel", "attn.qk_product", "attn.proj.kernel", "mlp.fc1.kernel",
                 "mlp.fc2.kernel"):
      assert f"blocks.{i}.{name}" in qkr
  lsq = {w.name: w.method for w in quantized_weights(tiny("standard", "lsq"))}
  assert lsq["blocks.1.attn.qkv.kernel"] == "lsq" and "blocks.1.attn.qk_product" not in lsq
  assert len(qkr) == 1 + 2 * 5 + 2 and len(lsq) == 1 + 2 * 4 + 2


@pytest.mark.parametrize("attention,method", [("qkr", "statsq"), ("standard", "lsq")])
def test_levels_are_what_the_forward_pass_rounds(attention, method):
  """Independent check: the forward pass's quantized kernel equals the level formula,
  ``s (k + 0.5) / n`` for StatsQ and ``k * step`` for LSQ, with ``s`` the tracked scale."""
  model = tiny(attention, method, bits=3)
  mods = modules(model)
  for w in quantized_weights(model):
    module = mods[w.path]
    levels = weight_levels(module, w)
    assert jnp.all(levels == jnp.round(levels))
    if w.attr == "qk_product":
      quantized, scale = module.quantized_qk_product(), weight_scale(module, w)
      scale = jnp.reshape(scale, quantized.shape[:2] + (1,))
    elif w.attr == "v_kernel":
      continue  # same StatsQ rule as a Dense kernel; the forward pass inlines it
    else:
      quantized = module.quantized_kernel() if w.path[0] != "patch_embed" else \
          module.weight_quant(module.kernel[...])
      scale = weight_scale(module, w)
    if w.method == "statsq":
      n = 2 ** (w.bits - 1)
      assert levels.min() >= -n and levels.max() <= n - 1
      expected = scale * (levels + 0.5) / n
    else:
      expected = levels * scale
    np.testing.assert_allclose(quantized, expected, rtol=1e-6, atol=1e-7, err_msg=w.name)


def test_tracker_counts_an_up_down_up_weight_in_its_own_tensor():
  """Hand sequence on the 8-bit LSQ head: entry (0, 0) goes to level 0, 1, 0, 1; the
  tracker flags exactly that weight, with the EMA of spec 4.5."""
  model = tiny()
  step = 0.01
  model.head.weight_quant.step[...] = jnp.full_like(model.head.weight_quant.step[...], step)
  tracker = OscillationTracker(model, momentum=0.5, threshold=0.3)
  kernel = np.array(model.head.kernel[...])
  kernel[0, 0] = 0.0
  model.head.kernel[...] = jnp.asarray(kernel)
  tracker.reset(model)
  head = tracker.names.index("head.kernel")
  history = []
  for level in (1, 0, 1):
    kernel[0, 0] = level * step
    model.head.kernel[...] = jnp.asarray(kernel)
    tracker.update(model)
    history.append(tracker.named_metrics(jax.device_get(tracker.layer_metrics(model))))
  assert [h["osc/flips/head.kernel"] for h in history] == [1, 1, 1]
  assert [h["osc/flips"] for h in history] == [1, 1, 1]  # nothing else moved
  ema = np.asarray(tracker.trackers[head].ema[...])
  assert ema[0, 0] == pytest.approx(0.5 * 1 + 0.5 * (0.5 * 1))  # events at updates 2 and 3
  assert np.count_nonzero(ema) == 1
  size = kernel.size
  assert history[0]["osc/oscillating_fraction/head.kernel"] == 0.0
  assert history[-1]["osc/oscillating_fraction/head.kernel"] == pytest.approx(1 / size)
  assert history[-1]["scale/mean/head.kernel"] == pytest.approx(step)
  sizes = dict(zip(tracker.names, tracker.sizes()))
  eight_bit = sizes["head.kernel"] + sizes["head_dist.kernel"] + sizes["patch_embed.kernel"]
  assert history[-1]["osc/oscillating_fraction_w8"] == pytest.approx(1 / eight_bit)
  assert history[-1]["osc/oscillating_fraction_w2"] == 0.0


def test_tracker_state_shards_like_its_weight():
  """On a 4 x 2 (data, fsdp) mesh every tracked kernel's state gets its kernel's sharding."""
  mesh = sharding.make_mesh(4, 2)
  model = tiny()
  tracker = OscillationTracker(model)
  params = nnx.state(model, nnx.Param)
  param_sh = sharding.state_shardings(params, mesh, 256)
  tracker_sh = sharding.state_shardings(nnx.state(tracker), mesh, 256)
  sharded = 0
  for w, t_sh in zip(tracker.weights, tracker_sh["trackers"].values()):
    if w.attr == "qk_product":
      continue
    kernel_sh = param_sh
    for part in w.path + (w.attr,):
      kernel_sh = kernel_sh[part]
    for field in ("prev_level", "prev_direction", "ema"):
      assert t_sh[field].get_value().spec == kernel_sh.get_value().spec, (w.name, field)
    sharded += "fsdp" in kernel_sh.get_value().spec
  assert sharded >= 4


def test_bad_tracking_settings_are_rejected():
  with pytest.raises(ValueError, match="every_steps=0"):
    OscillationTracker(tiny(), every_steps=0)
  with pytest.raises(ValueError, match="momentum=1.5"):
    OscillationTracker(tiny(), momentum=1.5)
