"""PNG plots of a run, drawn from ``workdir/metrics.jsonl`` alone.

  python -m ofq_jax.plots --workdir=DIR [--block=0]

writes ``DIR/plots/``:

* ``oscillation.png``: fraction of oscillating weights per quantized tensor (and in
  total) over QAT and CGA, stages laid end to end;
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
from typing import Any

from absl import app, flags

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


def plot_oscillation(records, path: str) -> bool:
  """Oscillating fraction per tensor over training; False when nothing was tracked."""
  prefix = "osc/oscillating_fraction/"
  names = sorted({k[len(prefix):] for r in records for k in r if k.startswith(prefix)})
  if not names:
    return False
  offsets = _offsets(records)
  import matplotlib  # pylint: disable=import-outside-toplevel
  fig, axes = _figure(size=(9.0, 5.0))
  ax = axes[0, 0]
  cmap = matplotlib.colormaps["viridis"]
  for i, name in enumerate(names):
    ax.plot(*_series(records, prefix + name, offsets), lw=0.8,
            color=cmap(i / max(len(names) - 1, 1)), label=name if len(names) <= 16 else None)
  ax.plot(*_series(records, "osc/oscillating_fraction", offsets), lw=2.2, color="crimson",
          label="all quantized weights")
  _stage_marks(ax, offsets)
  ax.set(xlabel="step (stages end to end)", ylabel="fraction of oscillating weights",
         title="Weight oscillation (EMA of oscillation events above threshold)")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def block_prefixes(records) -> list[str]:
  """``scales/<block>.`` of every block with scale records, in model order (DeiT's
  ``blocks.i``, Swin's ``stages.s.i``)."""
  found = {m.group(0) for r in records for k in r
           for m in [re.match(r"scales/(blocks\.\d+|stages\.\d+\.\d+)\.", k)] if m}
  return sorted(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])


def plot_scales(records, path: str, block: int = 0) -> bool:
  """Per-channel scale trajectories of one block's tensors (CGA, else QAT); ``block``
  counts blocks in model order (over all Swin stages)."""
  prefixes = block_prefixes(records)
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


def make_plots(workdir: str, block: int = 0) -> list[str]:
  """Draws every plot the run's metrics allow into ``workdir/plots``; returns the paths."""
  records = load_records(workdir)
  out = os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  written = []
  for name, draw in (("oscillation.png", plot_oscillation),
                     (f"scales_block{block}.png", lambda r, p: plot_scales(r, p, block)),
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
