"""Metrics out: ``metrics.jsonl``, TensorBoard event files, and a console progress line.

Only process 0 writes. One JSON object per logged step, e.g.
``{"step": 10, "stage": "qat", "train/loss": 1.2, "train/lr": 5e-4, ...}``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


class MetricsWriter:
  """Appends to ``workdir/metrics.jsonl`` and ``workdir/tensorboard/<stage>``."""

  def __init__(self, workdir: str, stage: str, *, enabled: bool | None = None,
               tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stage = stage
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))

  def write(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
    values = {k: _scalar(v) for k, v in scalars.items()}
    if not self.enabled:
      return values
    self._append({"step": int(step), "stage": self.stage, **values})
    if self._tb is not None:
      for key, value in values.items():
        if math.isfinite(value):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()
    return values

  def write_vectors(self, step: int, vectors: dict[str, Any]) -> None:
    """One record of whole vectors (e.g. per-channel scales) for plots: JSON lists in
    ``metrics.jsonl`` and TensorBoard histograms."""
    if not self.enabled:
      return
    values = {k: np.asarray(jax.device_get(v), np.float64).reshape(-1) for k, v in
              vectors.items()}
    self._append({"step": int(step), "stage": self.stage,
                  **{k: [float(x) for x in v] for k, v in values.items()}})
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_histogram(key, value, int(step))
      self._tb.flush()

  def _append(self, record: dict[str, Any]) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """``[qat] step 120/2287 (5.2%) loss 1.234 lr 5.0e-04 38.1 img/s ETA 0:12:03``."""

  def __init__(self, stage: str, total_steps: int, start_step: int, *,
               enabled: bool | None = None):
    self.stage = stage
    self.total = total_steps
    self.start_step = start_step
    self.start_time = time.time()
    self.enabled = jax.process_index() == 0 if enabled is None else enabled

  def eta_seconds(self, step: int) -> float:
    done = step - self.start_step
    if done <= 0:
      return float("nan")
    return (time.time() - self.start_time) / done * (self.total - step)

  def log(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    eta = self.eta_seconds(step)
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    parts = [f"[{self.stage}] step {step}/{self.total} ({100.0 * step / self.total:.1f}%)"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("train/lr", "lr {:.2e}"),
                     ("train/images_per_sec", "{:.1f} img/s"),
                     ("train/frozen_fraction", "frozen {:.4f}"),
                     ("osc/oscillating_fraction", "osc {:.4f}")):
      if key in values:
        parts.append(fmt.format(values[key]))
    parts.append(f"ETA {eta_text}")
    print(" ".join(parts), file=sys.stdout, flush=True)

  def message(self, text: str) -> None:
    if self.enabled:
      print(f"[{self.stage}] {text}", flush=True)
