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


def negate_entry(variable, index):
  """Flips one weight's sign: its channel's StatsQ scale ``2 mean|w|`` is unchanged and
  its level goes from ``k`` to ``-k - 1`` (the grid is symmetric), so exactly that
  weight flips, under both definitions."""
  values = np.array(variable[...])
  values[index] = -values[index]
  variable[...] = jnp.asarray(values)


def metrics_after_update(tracker, model):
  tracker.update(model)
  return tracker.named_metrics(jax.device_get(tracker.layer_metrics(model)))


def test_fused_qkv_is_reported_as_q_k_and_v_parts_and_groups():
  """One q weight of block 0's fused qkv kernel flips up and back: the flips land in the
  ``q`` part and the ``qk`` group only; the second flip reverses the first, so with
  momentum 0.5 its EMA (0.5) passes the 0.3 threshold and its channel is counted."""
  model = tiny("standard", "statsq")
  tracker = OscillationTracker(model, momentum=0.5, threshold=0.3)
  tracker.reset(model)
  kernel = model.blocks[0].attn.qkv.kernel
  column = 5  # of the q block (columns 0..63)
  history = []
  for _ in range(2):
    negate_entry(kernel, (3, column))
    history.append(metrics_after_update(tracker, model))
  name = "blocks.0.attn.qkv.kernel"
  for prefix in ("osc", "osc_grid"):
    for h in history:
      assert h[f"{prefix}/flips/{name}/q"] == 1, prefix
      assert h[f"{prefix}/flips/{name}/k"] == h[f"{prefix}/flips/{name}/v"] == 0, prefix
      assert h[f"{prefix}/flips/group/qk"] == h[f"{prefix}/flips"] == 1, prefix
      assert h[f"{prefix}/flips/group/v"] == h[f"{prefix}/flips/group/fc1"] == 0, prefix
    q_size = kernel.shape[0] * kernel.shape[1] // 3
    assert history[-1][f"{prefix}/oscillating_fraction/{name}/q"] == pytest.approx(1 / q_size)
  assert set(tracker_groups(history[-1])) == {"qk", "v", "proj", "fc1", "fc2", "patch_embed",
                                              "head"}
  channels = np.asarray(tracker.channel_oscillating()[name])
  assert channels[column] == 1 and channels.sum() == 1


def tracker_groups(metrics):
  prefix = "osc/oscillating_fraction/group/"
  return [k[len(prefix):] for k in metrics if k.startswith(prefix)]


def test_qkr_product_per_head_and_the_implied_factors():
  """QKR: the product is reported per head in group ``qk``; the factors W_q, W_k are
  followed on StatsQ's grid in group ``qk_implied`` and kept out of every total."""
  model = tiny()
  tracker = OscillationTracker(model)
  tracker.reset(model)
  assert [w.name for w in tracker.implied] == [
      f"blocks.{i}.attn.{f}_kernel" for i in range(2) for f in ("q", "k")]
  negate_entry(model.blocks[1].attn.q_kernel, (0, 0))
  metrics = metrics_after_update(tracker, model)
  assert set(tracker_groups(metrics)) == {"qk", "qk_implied", "v", "proj", "fc1", "fc2",
                                          "patch_embed", "head"}
  assert metrics["osc/flips/blocks.1.attn.q_kernel"] == 1
  assert metrics["osc/flips/group/qk_implied"] == 1
  in_groups = sum(metrics[f"osc/flips/group/{g}"] for g in tracker_groups(metrics)
                  if g != "qk_implied")
  assert metrics["osc/flips"] == in_groups  # the implied flip is in no total
  heads = [metrics[f"osc/flips/blocks.1.attn.qk_product/head{h}"] for h in range(2)]
  assert sum(heads) == metrics["osc/flips/blocks.1.attn.qk_product"]
  assert heads[1] == 0  # q_kernel column 0 belongs to head 0 only


def test_a_scale_jump_flips_still_weights_only_under_the_integer_level():
  """One fc1 weight jumps to 20x its channel's scale: ``2 mean|w|`` of that channel
  grows, so the channel's other (still) weights change integer level; on the fixed
  grid only the weight that moved can flip."""
  model = tiny()
  tracker = OscillationTracker(model)
  tracker.reset(model)
  kernel = model.blocks[0].mlp.fc1.kernel
  values = np.array(kernel[...])
  values[0, 0] = 20 * 2 * np.abs(values[:, 0]).mean()
  kernel[...] = jnp.asarray(values)
  metrics = metrics_after_update(tracker, model)
  name = "blocks.0.mlp.fc1.kernel"
  assert metrics[f"osc/flips/{name}"] >= 5
  assert metrics[f"osc_grid/flips/{name}"] <= 1
  assert metrics["osc_grid/flips"] <= 1


def test_the_fixed_grid_refreshes_every_grid_every_steps():
  """``grid_every_steps=4`` with ``every_steps=2``: the grid snapshot follows the scale
  at every second update only."""
  model = tiny()
  tracker = OscillationTracker(model, every_steps=2, grid_every_steps=4)
  tracker.reset(model)
  fc1 = tracker.names.index("blocks.0.mlp.fc1.kernel")
  kernel = model.blocks[0].mlp.fc1.kernel
  snapshots = []
  for _ in range(4):
    kernel[...] = kernel[...] * 1.5
    tracker.update(model)
    snapshots.append(float(tracker.trackers[fc1].grid_scale[...][0]))
  scale0 = float(weight_scale(model.blocks[0].mlp.fc1, tracker.weights[fc1])[0]) / 1.5 ** 4
  np.testing.assert_allclose(snapshots, [scale0, scale0 * 1.5 ** 2, scale0 * 1.5 ** 2,
                                         scale0 * 1.5 ** 4], rtol=1e-5)
  with pytest.raises(ValueError, match="grid_every_steps=3"):
    OscillationTracker(model, every_steps=2, grid_every_steps=3)
