"""The ablation report of bench/ablation_digits.py, on made-up run summaries (the
training runs themselves are the train tests' business; the full ablation takes ~45
minutes and is run by hand into RESULTS.md)."""

import importlib.util
import json
import sys

import pytest

from support import REPO


@pytest.fixture(scope="module")
def ablation():
  spec = importlib.util.spec_from_file_location("ablation_digits",
                                                REPO / "bench" / "ablation_digits.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def fake_results(args):
  results = {}
  for seed in args.seeds:
    results[("float", 0, seed)] = {"float_top1": 98.0 + seed}
    for bits in args.bits:
      results[("lsq", bits, seed)] = {"qat_top1": 80.0 + bits, "oscillating_fraction_qat": 0.02,
                                      "oscillating_fraction_low_bit_qat": 0.03}
      results[("statsq", bits, seed)] = {"qat_top1": 85.0 + seed,
                                         "oscillating_fraction_qat": 0.01,
                                         "oscillating_fraction_low_bit_qat": 0.01}
      results[("ofq", bits, seed)] = {"qat_top1": 90.0, "cga_top1": 91.0 + seed,
                                      "oscillating_fraction_qat": 0.012,
                                      "oscillating_fraction_cga": 0.004,
                                      "oscillating_fraction_low_bit_qat": 0.012,
                                      "oscillating_fraction_low_bit_cga": 0.002}
  return results


def test_plan_runs_float_once_per_seed_and_reuses_it(ablation, tmp_path):
  args = ablation.parse_args([f"--workdir={tmp_path}", "--seeds=0,1,2", "--bits=2,4"])
  floats, quantized = ablation.plan(args)
  assert [r.seed for r in floats] == [0, 1, 2]
  assert len(quantized) == 3 * 2 * 3  # seeds x bits x (lsq, statsq, ofq)
  ofq = [r for r in quantized if r.method == "ofq" and r.seed == 1 and r.bits == 4][0]
  assert ofq.args[0] == "--config=configs/digits.py:method=ofq,bits=4,seed=1"
  assert "--config.stages=('qat','cga')" in ofq.args
  assert f"--config.qat.teacher={tmp_path}/seed1/float/models/float" in ofq.args


def test_low_bit_fractions_weigh_tensors_by_size(ablation, tmp_path):
  """From a made-up metrics.jsonl: only the 2-bit tensors count, weighted by size."""
  run = ablation.Run("lsq", 2, 0, tmp_path, [])
  from ofq_jax.models import create_model
  from ofq_jax.models.tracker import OscillationTracker
  from ofq_jax.recipes import digits_recipe
  config = digits_recipe("method=lsq,bits=2")
  config.model.quant.enabled = True
  tracker = OscillationTracker(create_model(config.model))
  record = {"stage": "qat", "step": 9, "osc/oscillating_fraction": 0.5}
  for w in tracker.weights:  # 8-bit tensors at 1.0 must not count
    record[f"osc/oscillating_fraction/{w.name}"] = 1.0 if w.bits == 8 else (
        0.5 if w.name.endswith("fc1.kernel") else 0.0)
  (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
  sizes = dict(zip(tracker.names, tracker.sizes()))
  low = [n for n, w in zip(tracker.names, tracker.weights) if w.bits == 2]
  expected = 0.5 * sum(sizes[n] for n in low if n.endswith("fc1.kernel")) / sum(
      sizes[n] for n in low)
  result = ablation.low_bit_fractions(run)
  assert result == {"oscillating_fraction_low_bit_qat": pytest.approx(expected)}


def test_report_fills_every_cell_and_checks_the_claims(ablation, tmp_path):
  args = ablation.parse_args([f"--workdir={tmp_path}", "--seeds=0,1,2", "--bits=2,3"])
  rows = ablation.collect(args, fake_results(args))
  # StatsQ + QKR is read from the OFQ run's QAT stage.
  assert rows[(2, "statsq_qkr")]["top1"] == [90.0, 90.0, 90.0]
  assert rows[(2, "ofq")]["top1"] == [91.0, 92.0, 93.0]
  text = ablation.report(args, rows, {}, 60.0, "python bench/ablation_digits.py")
  assert ("| StatsQ + QKR + CGA (OFQ) | 92.00 ± 1.00 | 1.200 ± 0.000 | 0.200 ± 0.000 | "
          "1.200 ± 0.000 | 0.400 ± 0.000 |") in text
  assert "| float (teacher) | 99.00 ± 1.00 |" in text
  for line in text.splitlines():
    if line.startswith("| ") and not line.startswith("| method") and "---" not in line:
      cells = [c.strip() for c in line.strip("|").split("|")]
      assert all(cells) and not any("nan" in c for c in cells), line
  assert "| W2A2 | StatsQ oscillates less than LSQ weights | 1.000 % vs 3.000 % | agrees |" in text
  assert ("| W2A2 | QKR reduces oscillation (StatsQ+QKR < StatsQ) | 1.200 % vs 1.000 % | "
          "**disagrees** |") in text
