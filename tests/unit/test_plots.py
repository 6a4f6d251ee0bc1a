"""The run plots, drawn from hand-made ``metrics.jsonl`` records."""

import json

import pytest

from ofq_jax import plots
from support import hf_vit


def records():
  """QAT (steps 10, 20) then CGA (step 10): two tensors, per-group keys of both flip
  definitions, and per-channel scale / oscillation vectors."""
  out = []
  for stage, step, osc in (("qat", 10, 0.02), ("qat", 20, 0.03), ("cga", 10, 0.01)):
    scalars = {"step": step, "stage": stage}
    for prefix in ("osc", "osc_grid"):
      scalars[f"{prefix}/oscillating_fraction"] = osc
      for group in ("qk", "fc1", "qk_implied"):
        scalars[f"{prefix}/oscillating_fraction/group/{group}"] = osc / 2
      scalars[f"{prefix}/oscillating_fraction/blocks.0.mlp.fc1.kernel"] = osc
      scalars[f"{prefix}/oscillating_fraction/blocks.0.attn.qk_product"] = osc / 3
      scalars[f"{prefix}/oscillating_fraction/blocks.0.attn.qk_product/head0"] = osc / 3
    out.append(scalars)
    out.append({"step": step, "stage": stage,
                "scales/blocks.0.mlp.fc1.kernel": [1.0, 2.0, 3.0],
                "osc_channels/blocks.0.mlp.fc1.kernel": [0, 7, 1] if stage == "qat" else [0, 0, 0],
                "scales/blocks.0.attn.qk_product": [0.5, 0.6],
                "osc_channels/blocks.0.attn.qk_product": [3, 0],
                "scales/head.kernel": [0.1], "osc_channels/head.kernel": [50]})
  return out


def test_most_oscillating_channels_are_ranked_at_the_end_of_qat():
  """Counts at the last QAT record: fc1[1] = 7, qk[0] = 3, fc1[2] = 1; zeros are left
  out, CGA's all-zero fc1 counts do not decide, and the 8-bit head (50) is never picked."""
  assert plots.most_oscillating_channels(records()) == [
      ("blocks.0.mlp.fc1.kernel", 1), ("blocks.0.attn.qk_product", 0),
      ("blocks.0.mlp.fc1.kernel", 2)]
  assert plots.most_oscillating_channels(records(), count=1) == [("blocks.0.mlp.fc1.kernel", 1)]


def test_tensor_keys_exclude_groups_and_parts():
  assert plots._tensors(records(), "osc") == ["blocks.0.attn.qk_product",  # pylint: disable=protected-access
                                             "blocks.0.mlp.fc1.kernel"]
  assert plots._groups(records(), "osc_grid") == ["qk", "qk_implied", "fc1"]  # pylint: disable=protected-access


@pytest.mark.parametrize("drawn", [True, False])
def test_make_plots_draws_the_oscillation_and_channel_plots(tmp_path, drawn):
  rows = records() if drawn else [{"step": 1, "stage": "float", "eval/top1": 50.0,
                                   "train/loss": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  written = {p.rsplit("/", 1)[-1] for p in plots.make_plots(str(tmp_path))}
  expected = {"oscillation.png", "channel_scales.png"}
  assert (expected <= written) == drawn and (expected & written == set()) != drawn
  for name in written:
    assert (tmp_path / "plots" / name).stat().st_size > 5_000


def test_another_family_is_read_through_its_declaration():
  """The same records under a family with other layer names (``tests/support/hf_vit.py``):
  its 8-bit ``classifier`` is never picked and its blocks are ``encoder.N``."""
  renamed = [{k.replace("blocks.0.mlp.fc1", "encoder.0.ffn.up")
              .replace("blocks.0.attn", "encoder.0.attention")
              .replace("head.kernel", "classifier.kernel"): v for k, v in r.items()}
             for r in records()]
  assert plots.most_oscillating_channels(renamed, family=hf_vit.FAMILY) == [
      ("encoder.0.ffn.up.kernel", 1), ("encoder.0.attention.qk_product", 0),
      ("encoder.0.ffn.up.kernel", 2)]
  assert plots.block_prefixes(renamed, hf_vit.FAMILY) == ["scales/encoder.0."]
  assert plots.block_prefixes(renamed) == []  # DeiT's blocks: none here
