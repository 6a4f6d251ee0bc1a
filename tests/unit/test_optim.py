"""Schedule, weight-decay grouping, AdamW, KD loss and the CGA transform.

Expected values: the spec 5.1 formulas evaluated by hand, torch.optim.AdamW as an
independent implementation, numpy for the KD loss.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from ofq_jax import cga as cga_lib
from ofq_jax import losses, optim
from ofq_jax.paths import state_path
from ofq_jax.models import create_model, model_config
from ofq_jax.models import deit
from ofq_jax.models.deit import Logits
from ofq_jax.models.quantizers import QuantBuffer

RECIPE = dict(base_lr=5.47e-4, epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)


def reference_lr(epoch: int) -> float:
  """timm 0.5.4 CosineLRScheduler, t_in_epochs, warmup_prefix=False, cycle_limit=1."""
  lr, warm_lr, min_lr, total, warm = 5.47e-4, 1e-6, 1e-5, 300, 5
  if epoch < warm:
    return warm_lr + epoch * (lr - warm_lr) / warm
  if epoch >= total:
    return min_lr
  return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / total))


@pytest.mark.parametrize("epoch", [0, 1, 5, 150, 300, 309])
def test_lr_schedule_matches_formula(epoch):
  assert float(optim.lr_at_epoch(epoch, **RECIPE)) == pytest.approx(reference_lr(epoch),
                                                                   rel=1e-6)
  schedule = optim.epoch_schedule(2287, **RECIPE)
  for step in (epoch * 2287, epoch * 2287 + 2286):
    assert float(schedule(jnp.int32(step))) == pytest.approx(reference_lr(epoch), rel=1e-5)


def test_lr_schedule_landmarks():
  assert float(optim.lr_at_epoch(0, **RECIPE)) == pytest.approx(1e-6)
  assert float(optim.lr_at_epoch(150, **RECIPE)) == pytest.approx((5.47e-4 + 1e-5) / 2)
  assert float(optim.lr_at_epoch(305, **RECIPE)) == pytest.approx(1e-5)  # cooldown


def test_weight_decay_mask_follows_timm_grouping():
  model = create_model(model_config(None, embed_dim=64, depth=1, num_heads=2, patch_size=8,
                                    img_size=32, num_classes=5, quant=dict(enabled=True)))
  _, params, _ = nnx.split(model, nnx.Param, QuantBuffer)
  flat, _ = jax.tree_util.tree_flatten_with_path(
      optim.weight_decay_mask(params, deit.FAMILY.no_decay))
  mask = {state_path(path): bool(leaf) for path, leaf in flat}
  decayed = {".".join(map(str, p)) for p, v in mask.items() if v}
  assert decayed == {
      "patch_embed.kernel", "blocks.0.attn.q_kernel", "blocks.0.attn.k_kernel",
      "blocks.0.attn.v_kernel", "blocks.0.attn.proj.kernel", "blocks.0.mlp.fc1.kernel",
      "blocks.0.mlp.fc2.kernel", "head.kernel", "head_dist.kernel"}
  # The QKR per-(token, head) step is 2-D here but 1-D in the reference: not decayed.
  assert not mask[("blocks", 0, "attn", "qkx_quant", "step")]
  assert not mask[("pos_embed",)] and not mask[("cls_token",)]


def test_adamw_equals_torch():
  """Three AdamW steps with decoupled weight decay, against torch.optim.AdamW."""
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 3)).astype(np.float32)
  grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
  tx = optim.adamw(1e-2, weight_decay=0.05, mask=None)
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
  for g in grads:
    w.grad = torch.from_numpy(g)
    opt.step()
  np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_kd_loss_by_hand():
  rng = np.random.default_rng(1)
  cls_logits, dist_logits, teacher = (rng.normal(size=(3, 5)).astype(np.float32)
                                      for _ in range(3))
  labels = np.array([0, 3, 4])

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  p_teacher = np.exp(log_softmax(teacher))
  soft = -(p_teacher * log_softmax(dist_logits)).sum(-1).mean()
  hard = -log_softmax(cls_logits)[np.arange(3), labels].mean()
  got = losses.kd_loss(jnp.asarray(cls_logits), jnp.asarray(dist_logits), jnp.asarray(teacher),
                       jnp.asarray(labels), num_classes=5)
  assert float(got) == pytest.approx(soft + hard, rel=1e-6)
  # The teacher gets no gradient.
  g = jax.grad(lambda t: losses.kd_loss(jnp.asarray(cls_logits), jnp.asarray(dist_logits), t,
                                        jnp.asarray(labels), num_classes=5))(
                                            jnp.asarray(teacher))
  assert float(jnp.max(jnp.abs(g))) == 0.0


def test_stage_losses_over_logits():
  """float_loss = mean of the two heads' CE; distill_loss = kd_loss against the teacher's
  cls head ('cls', the reference) or its heads' mean ('avg'); a typo fails up front."""
  rng = np.random.default_rng(2)
  out, teacher = (Logits(*(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
                           for _ in range(2))) for _ in range(2))
  batch = {"label": jnp.asarray([0, 3, 4])}
  ce = lambda x: losses.classification_loss(x, batch["label"], num_classes=5)
  float_loss = losses.stage_loss(distill=False, num_classes=5)
  assert float(float_loss(out, batch)) == pytest.approx(0.5 * float(ce(out.cls) + ce(out.dist)))
  for mode, soft in (("cls", teacher.cls), ("avg", (teacher.cls + teacher.dist) / 2)):
    loss = losses.stage_loss(distill=True, num_classes=5, teacher_logits=mode)
    expected = losses.kd_loss(out.cls, out.dist, soft, batch["label"], num_classes=5)
    assert float(loss(out, batch, teacher)) == pytest.approx(float(expected)), mode
  with pytest.raises(ValueError, match="kd.teacher_logits='clss' is not one of"):
    losses.stage_loss(distill=True, num_classes=5, teacher_logits="clss")


def test_single_head_kd_is_soft_plus_hard_ce_on_the_same_logits():
  """A one-head model (Swin) returns bare logits: KD is soft CE to the teacher + hard CE,
  T = 1, equal weights, both on those logits (SWIN.md 8.3); the float stage is plain CE."""
  rng = np.random.default_rng(3)
  logits, teacher = (jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for _ in range(2))
  batch = {"label": jnp.asarray([1, 2, 0])}
  kd = losses.stage_loss(distill=True, num_classes=5)
  expected = (losses.soft_cross_entropy(logits, teacher) +
              losses.classification_loss(logits, batch["label"], num_classes=5))
  assert float(kd(logits, batch, teacher)) == pytest.approx(float(expected), rel=1e-6)
  plain = losses.stage_loss(distill=False, num_classes=5)(logits, batch)
  assert float(plain) == pytest.approx(
      float(losses.classification_loss(logits, batch["label"], num_classes=5)), rel=1e-6)


def test_cga_freezes_bit_exactly_while_trainable_weights_move():
  """5 AdamW steps with weight decay and a non-zero first moment: frozen entries of the
  target are bit-identical, trainable ones (near a threshold) and non-targets move; the
  state carries the frozen share of each update (checked against the mask by hand)."""
  rng = np.random.default_rng(2)
  w = rng.normal(size=(48, 32)).astype(np.float32)
  other = rng.normal(size=(8,)).astype(np.float32)
  params = {"w": jnp.asarray(w), "other": jnp.asarray(other)}
  bits = {"w": 2, "other": 0}
  tx = cga_lib.cga(optax.adamw(1e-3, weight_decay=0.05), bits, boundary_range=0.05)
  state = tx.init(params)
  frozen0 = np.asarray(cga_lib.frozen_masks(params, bits, 0.05)["w"])
  assert 0.5 < frozen0.mean() < 1.0
  for i in range(5):
    grads = {"w": jnp.asarray(rng.normal(size=w.shape), jnp.float32),
             "other": jnp.ones_like(params["other"])}
    frozen = np.asarray(cga_lib.frozen_masks(params, bits, 0.05)["w"])
    before = np.asarray(params["w"])
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    after = np.asarray(params["w"])
    # The state reports the share its update froze: the pre-step weights' mask.
    assert float(state.frozen["w"]) == pytest.approx(frozen.mean(), abs=1e-7)
    assert cga_lib.reported_fractions((optax.EmptyState(), state)) is state.frozen
    np.testing.assert_array_equal(after[frozen], before[frozen])
    assert np.all(after[~frozen] != before[~frozen])
  assert np.all(np.asarray(params["other"]) != other)
  fractions = cga_lib.frozen_fractions(params, bits, 0.05)
  assert set(fractions) == {"w", "total"} and 0.5 < float(fractions["total"]) <= 1.0
