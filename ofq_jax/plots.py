"""PNG plots of a run, drawn from ``workdir/metrics.jsonl`` alone.

  python -m ofq_jax.plots --workdir=DIR [--block=0]

writes ``DIR/plots/``:

* ``oscillation.png``: fraction of oscillating low-bit weights per module type (qk, v,
  proj, fc1, fc2, ...; the 8-bit patch embedding and heads left out) over QAT and CGA,
  stages laid end to end, one panel per flip definition (integer level; fixed grid),
  the most oscillating tensors named;
* ``channel_scales.png``: the per-channel scales of the most oscillating channels over
  QAT and CGA (the paper's Figure 1 style);
* ``scales_block<B>.png``: the per-channel StatsQ scales (``2 mean|w|``) of block B's
  quantized tensors during CGA (during QAT when the run has no CGA stage), one line
  per output channel, as in the figure of the OFQ authors' README;
* ``accuracy.png``: eval top-1 and train loss over all stages.

``train_and_evaluate`` draws them at the end of every run; this command redraws them
(e.g. for another block) while a run is going or after it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
from absl import app, flags

if TYPE_CHECKING:  # the models (and jax) are imported only where a family is looked up
  from ofq_jax.models.family import Family

STAGE_ORDER = ("float", "qat", "cga")
MAX_CHANNELS = 64
"""Scale plots draw at most this many channels per tensor (evenly spaced), for legibility."""


def load_records(workdir: str) -> list[dict[str, Any]]:
  """The records of ``metrics.jsonl``; a clear error when there is none."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {path}: point --workdir at a training run's directory.")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _offsets(records: Sequence[dict[str, Any]]) -> dict[str, int]:
  """Global-step offset of each stage, so stages are drawn end to end."""
  last = {}
  for r in records:
    last[r["stage"]] = max(last.get(r["stage"], 0), r["step"])
  offsets, total = {}, 0
  for stage in sorted(last, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
    offsets[stage] = total
    total += last[stage]
  return offsets


def _series(records, key: str, offsets) -> tuple[list[int], list[float]]:
  points = sorted((offsets[r["stage"]] + r["step"], r[key]) for r in records if key in r)
  return [p[0] for p in points], [p[1] for p in points]


def _stage_marks(ax, offsets: dict[str, int]) -> None:
  for stage, offset in offsets.items():
    if offset:
      ax.axvline(offset, color="grey", lw=0.8, ls="--")
      ax.text(offset, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), va="top",
              fontsize=8, color="grey")


def _figure(rows: int = 1, cols: int = 1, size=(7.0, 4.0)):
  """A pyplot-free Figure: drawing files never switches a notebook's backend."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(size[0] * cols, size[1] * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  return fig, axes


GROUP_COLORS = {"qk": "crimson", "qk_implied": "salmon", "v": "darkorange", "proj": "gold",
                "fc1": "seagreen", "fc2": "steelblue", "reduction": "purple",
                "patch_embed": "grey", "head": "black"}
DEFINITION_TITLES = {"osc": "integer level (current scale)",
                     "osc_grid": "fixed grid (scale frozen between refreshes)"}
TOP_TENSORS = 4
"""Oscillation plots name this many most-oscillating tensors."""
EIGHT_BIT_GROUPS = ("patch_embed", "head")
"""Module types OFQ keeps at 8 bits (LSQ, the same in every method): drawn as groups, never
picked as the most oscillating tensors or channels."""


def _groups(records, prefix: str) -> list[str]:
  start = f"{prefix}/oscillating_fraction/group/"
  return sorted({k[len(start):] for r in records for k in r if k.startswith(start)},
                key=lambda g: list(GROUP_COLORS).index(g) if g in GROUP_COLORS else 99)


def _tensors(records, prefix: str) -> list[str]:
  """Per-tensor keys (no part suffix, no group) of one definition."""
  start = f"{prefix}/oscillating_fraction/"
  return sorted({k[len(start):] for r in records for k in r
                 if k.startswith(start) and "/" not in k[len(start):]})


def _last(records, key: str, stage: str | None = None) -> float:
  values = [r[key] for r in records if key in r and (stage is None or r["stage"] == stage)]
  return values[-1] if values else float("nan")


def plot_oscillation(records, path: str, family: Family | None = None) -> bool:
  """Oscillating fraction per module type over QAT and CGA, one panel per flip
  definition, with the most oscillating tensors (at the end of QAT) named; False when
  nothing was tracked. ``family``: the run's model family (``_family``)."""
  kind = _family(family).kind
  definitions = [p for p in DEFINITION_TITLES if _groups(records, p) or _tensors(records, p)]
  if not definitions:
    return False
  offsets = _offsets(records)
  fig, axes = _figure(1, len(definitions), size=(7.0, 4.6))
  for ax, prefix in zip(axes[0], definitions):
    for group in _groups(records, prefix):
      if group in EIGHT_BIT_GROUPS:
        continue
      ax.plot(*_series(records, f"{prefix}/oscillating_fraction/group/{group}", offsets),
              lw=1.6, color=GROUP_COLORS.get(group, "tab:blue"),
              ls=":" if group == "qk_implied" else "-",
              label=group + (" (W_q, W_k implied)" if group == "qk_implied" else ""))
    stage = "qat" if any(r["stage"] == "qat" for r in records) else None
    low_bit = [n for n in _tensors(records, prefix)  # QKR's implied factors: not rounded
               if kind(n) not in EIGHT_BIT_GROUPS + ("qk_implied",)]
    ranked = sorted(low_bit, key=lambda n: -np.nan_to_num(
        _last(records, f"{prefix}/oscillating_fraction/{n}", stage)))
    for name in ranked[:TOP_TENSORS]:
      ax.plot(*_series(records, f"{prefix}/oscillating_fraction/{name}", offsets), lw=0.6,
              ls="--", color=GROUP_COLORS.get(kind(name), "tab:blue"), label=name)
    bits = _low_bits(records, prefix)
    total = f"{prefix}/oscillating_fraction" + (f"_w{bits}" if bits else "")
    ax.plot(*_series(records, total, offsets), lw=2.4, color="black", alpha=0.5,
            label=f"all {bits}-bit weights" if bits else "all rounded weights")
    _stage_marks(ax, offsets)
    ax.set(xlabel="step (stages end to end)", ylabel="fraction of oscillating weights",
           title=f"Oscillation by module type ({bits or 'all'}-bit): "
                 f"{DEFINITION_TITLES[prefix]}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def _low_bits(records, prefix: str) -> int | None:
  """The lowest weight bit-width with a total (``<prefix>/oscillating_fraction_w<b>``)."""
  found = {int(m.group(1)) for r in records for k in r
           for m in [re.fullmatch(rf"{prefix}/oscillating_fraction_w(\d+)", k)] if m}
  return min(found) if found else None


def _family(family: Family | None) -> Family:
  """The family whose declaration names the tensors (DeiT when not given: a config
  without ``arch``)."""
  if family is not None:
    return family
  from ofq_jax.models import family_of  # pylint: disable=import-outside-toplevel
  return family_of(ml_collections.ConfigDict())


TOP_CHANNELS = 8
"""The scale-trajectory plot follows this many most-oscillating channels."""


def most_oscillating_channels(records, count: int = TOP_CHANNELS,
                              family: Family | None = None) -> list[tuple[str, int]]:
  """``(tensor, channel)`` of the channels with the most oscillating weights in the last
  ``osc_channels`` record of QAT (the last one of any stage when there is no QAT)."""
  kind = _family(family).kind
  with_counts = [r for r in records if any(k.startswith("osc_channels/") for k in r)]
  qat = [r for r in with_counts if r["stage"] == "qat"]
  if not (qat or with_counts):
    return []
  last = (qat or with_counts)[-1]
  ranked = sorted(((v, k[len("osc_channels/"):], c) for k, vec in last.items()
                   if k.startswith("osc_channels/")
                   and kind(k[len("osc_channels/"):]) not in EIGHT_BIT_GROUPS
                   for c, v in enumerate(vec)),
                  key=lambda t: -t[0])
  return [(name, c) for v, name, c in ranked[:count] if v > 0]


def plot_channel_scales(records, path: str, family: Family | None = None) -> bool:
  """Scale trajectories of the most oscillating low-bit channels over QAT and CGA
  (stages end to end), each relative to its first recorded value so that channels of
  different magnitudes share one axis, as in the paper's Figure 1: does CGA hold them
  still?"""
  chosen = most_oscillating_channels(records, family=family)
  if not chosen:
    return False
  offsets = _offsets(records)
  fig, axes = _figure(size=(9.0, 4.6))
  ax = axes[0, 0]
  import matplotlib  # pylint: disable=import-outside-toplevel
  colors = matplotlib.colormaps["tab10"]
  for i, (name, channel) in enumerate(chosen):
    key = f"scales/{name}"
    points = sorted((offsets[r["stage"]] + r["step"], r[key][channel])
                    for r in records if key in r and r["stage"] in ("qat", "cga"))
    ax.plot([p[0] for p in points], [p[1] / points[0][1] for p in points], lw=0.9,
            color=colors(i % 10), alpha=0.9, label=f"{name}[{channel}]")
  _stage_marks(ax, {k: v for k, v in offsets.items() if k in ("qat", "cga")})
  ax.set(xlabel="step (stages end to end)", ylabel="scale / its first recorded value",
         title=f"Scales of the {len(chosen)} most oscillating channels (end of QAT)")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def block_prefixes(records, family: Family | None = None) -> list[str]:
  """``scales/<block>.`` of every block with scale records, in model order (the family's
  ``Family.blocks``: DeiT's ``blocks.i``, Swin's ``stages.s.i``)."""
  blocks = _family(family).blocks
  found = {m.group(0) for r in records for k in r
           for m in [re.match(rf"scales/({blocks})\.", k)] if m}
  return sorted(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])


def plot_scales(records, path: str, block: int = 0, family: Family | None = None) -> bool:
  """Per-channel scale trajectories of one block's tensors (CGA, else QAT); ``block``
  counts blocks in model order (over all Swin stages)."""
  prefixes = block_prefixes(records, family)
  if block >= len(prefixes):
    return False
  prefix = prefixes[block]
  vectors = [r for r in records if any(k.startswith(prefix) for k in r)]
  stage = "cga" if any(r["stage"] == "cga" for r in vectors) else "qat"
  vectors = sorted((r for r in vectors if r["stage"] == stage), key=lambda r: r["step"])
  if not vectors:
    return False
  names = sorted(k for k in vectors[0] if k.startswith(prefix))
  fig, axes = _figure(1, len(names), size=(3.6, 3.4))
  for ax, key in zip(axes[0], names):
    steps = [r["step"] for r in vectors if key in r]
    rows = [r[key] for r in vectors if key in r]
    channels = len(rows[0])
    stride = max(1, channels // MAX_CHANNELS)
    for c in range(0, channels, stride):
      ax.plot(steps, [row[c] for row in rows], lw=0.7)
    ax.set(title=key[len("scales/"):], xlabel=f"{stage} step", ylabel="scale")
    ax.title.set_fontsize(8)
  fig.suptitle(f"Per-channel quantizer scales of block {block} during {stage.upper()}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def plot_accuracy(records, path: str) -> bool:
  """Eval top-1 and train loss over all stages."""
  offsets = _offsets(records)
  steps, top1 = _series(records, "eval/top1", offsets)
  if not steps:
    return False
  fig, axes = _figure(1, 2, size=(5.0, 3.6))
  axes[0, 0].plot(steps, top1, marker="o", ms=3)
  axes[0, 0].set(xlabel="step (stages end to end)", ylabel="eval top-1 %", title="Accuracy")
  axes[0, 1].plot(*_series(records, "train/loss", offsets), lw=0.8)
  axes[0, 1].set(xlabel="step (stages end to end)", ylabel="train loss", title="Loss",
                 yscale="log")
  for ax in axes[0]:
    _stage_marks(ax, offsets)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def _run_family(workdir: str) -> Family:
  """The family of the run's model (``run.json``; DeiT when the workdir has none)."""
  from ofq_jax import run_record  # pylint: disable=import-outside-toplevel
  from ofq_jax.models import family_of  # pylint: disable=import-outside-toplevel
  return family_of(run_record.recorded_model(workdir) or ml_collections.ConfigDict())


def make_plots(workdir: str, block: int = 0) -> list[str]:
  """Draws every plot the run's metrics allow into ``workdir/plots``; returns the paths."""
  records = load_records(workdir)
  family = _run_family(workdir)
  out = os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  written = []
  for name, draw in (("oscillation.png", lambda r, p: plot_oscillation(r, p, family)),
                     ("channel_scales.png", lambda r, p: plot_channel_scales(r, p, family)),
                     (f"scales_block{block}.png",
                      lambda r, p: plot_scales(r, p, block, family)),
                     ("accuracy.png", plot_accuracy)):
    path = os.path.join(out, name)
    if draw(records, path):
      written.append(path)
  return written


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for path in make_plots(flags.FLAGS.workdir, flags.FLAGS.block):
    print(path)


if __name__ == "__main__":
  # Defined here, not at import, so that train.py can import this module next to
  # main.py's own --workdir flag.
  flags.DEFINE_string("workdir", None, "Training run directory (has metrics.jsonl).")
  flags.DEFINE_integer("block", 0, "Transformer block whose scales are drawn.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
