"""The ablation report of bench/ablation_digits.py, on made-up run summaries and
metrics (the training runs themselves are the train tests' business; the full ablation
takes ~40 minutes on 2 cores and is run by hand into RESULTS.md)."""

import json

import pytest

from support import load_bench


@pytest.fixture(scope="module")
def ablation():
  return load_bench("ablation_digits")


def oscillation(total, qk, grid_scale=1.0, implied=None):
  """A stage's numbers: integer-level values, fixed-grid ones ``grid_scale`` times them."""
  values = {}
  for prefix, factor in (("osc", 1.0), ("osc_grid", grid_scale)):
    values[f"{prefix}/total"] = total * factor
    values[f"{prefix}/qk"] = qk * factor
    values[f"{prefix}/fc1"] = total * factor
    if implied is not None:
      values[f"{prefix}/qk_implied"] = implied * factor
  return values


def fake_results(args):
  """StatsQ oscillates more than LSQ under the integer level only (grid 0.2x); QKR's
  implied q/k oscillate less than StatsQ's q/k under both definitions."""
  results = {}
  for seed in args.seeds:
    for arch in args.archs:
      results[(arch, "float", 0, seed)] = {"float_top1": 98.0 + seed}
      for bits in args.bits:
        results[(arch, "lsq", bits, seed)] = {
            "qat_top1": 80.0 + bits, "oscillation": {"qat": oscillation(0.02, 0.02)}}
        results[(arch, "statsq", bits, seed)] = {
            "qat_top1": 85.0 + seed, "oscillation": {"qat": oscillation(0.03, 0.04, 0.2)}}
        results[(arch, "ofq", bits, seed)] = {
            "qat_top1": 90.0, "cga_top1": 91.0 + seed, "oscillation": {
                "qat": oscillation(0.012, 0.05, implied=0.01),
                "cga": oscillation(0.004, 0.05, implied=0.01)}}
        results[(arch, "ofq_qk", bits, seed)] = {
            "cga_top1": 92.0 + seed, "oscillation": {"cga": oscillation(0.003, 0.001)}}
  return results


def test_plan_runs_float_once_per_seed_and_arch_and_resumes_ofq_for_include_qk(ablation,
                                                                              tmp_path):
  args = ablation.parse_args([f"--workdir={tmp_path}", "--seeds=0,1,2", "--bits=2,4"])
  floats, quantized, resumed = ablation.plan(args)
  assert [(r.arch, r.seed) for r in floats] == [(a, s) for s in (0, 1, 2)
                                               for a in ("deit", "swin")]
  assert len(quantized) == 3 * 2 * (3 + 2)  # seeds x bits x (deit: lsq, statsq, ofq; swin: 2)
  assert not any(r.arch == "swin" and r.method == "lsq" for r in quantized)
  ofq = [r for r in quantized if r.key == ("deit", "ofq", 4, 1)][0]
  assert ofq.args[0] == "--config=configs/digits.py:arch=deit,method=ofq,bits=4,seed=1"
  assert "--config.stages=('qat','cga')" in ofq.args
  assert f"--config.qat.teacher={tmp_path}/seed1/deit/float/models/float" in ofq.args
  qk = [r for r in resumed if r.key == ("swin", "ofq_qk", 2, 0)][0]
  assert "--config.stages=('cga',)" in qk.args and "--config.cga.include_qk=True" in qk.args
  assert f"--config.cga.resume={tmp_path}/seed0/swin/w2a2_ofq/checkpoints/qat" in qk.args


def test_stage_oscillation_reads_the_last_tracked_record_of_each_stage(ablation, tmp_path):
  records = [{"stage": "qat", "step": 5, "osc/oscillating_fraction": 0.9},
             {"stage": "qat", "step": 9, "osc/oscillating_fraction": 0.5,
              "osc/oscillating_fraction_w2": 0.25, "osc/oscillating_fraction_w8": 0.75,
              "osc_grid/oscillating_fraction_w2": 0.125,
              "osc/oscillating_fraction/group/qk": 0.5,
              "osc_grid/oscillating_fraction/group/qk_implied": 0.0625,
              "osc/oscillating_fraction/group/head": 0.75},
             {"stage": "qat", "step": 9, "eval/top1": 90.0},
             {"stage": "cga", "step": 3, "osc/oscillating_fraction": 0.1,
              "osc/oscillating_fraction_w2": 0.05}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert ablation.stage_oscillation(tmp_path, 2) == {
      "qat": {"osc/total": 0.25, "osc_grid/total": 0.125, "osc/qk": 0.5,
              "osc_grid/qk_implied": 0.0625},  # the 8-bit head group is not reported
      "cga": {"osc/total": 0.05}}


def test_report_fills_every_cell_and_checks_the_claims(ablation, tmp_path):
  args = ablation.parse_args([f"--workdir={tmp_path}", "--seeds=0,1,2", "--bits=2,3",
                              "--archs=deit,swin"])
  rows = ablation.collect(args, fake_results(args))
  # StatsQ + QKR is read from the OFQ run's QAT stage; ofq_qk's QAT from the OFQ run.
  assert rows[("deit", 2, "statsq_qkr")]["top1"] == [90.0, 90.0, 90.0]
  assert rows[("swin", 2, "ofq_qk")]["qat:osc/total"] == [0.012] * 3
  assert "cga:osc/total" not in rows[("deit", 2, "statsq_qkr")]
  text = ablation.report(args, rows, {}, 60.0, "python bench/ablation_digits.py")
  assert ("| StatsQ + QKR + CGA (OFQ) | 92.00 ± 1.00 | 1.200 ± 0.000 | 0.400 ± 0.000 | "
          "1.200 ± 0.000 | 0.400 ± 0.000 |") in text
  assert "| float (teacher) | 99.00 ± 1.00 |" in text
  assert "| OFQ + CGA on W_qk (cga.include_qk), after CGA | 0.100 ± 0.000 |" in text
  for line in text.splitlines():
    if line.startswith("| ") and not line.startswith(("| method", "| model")) \
        and "---" not in line:
      cells = [c.strip() for c in line.strip("|").split("|")]
      assert all(cells) and not any("nan" in c for c in cells), line
  assert ("| DeiT W2A2 | StatsQ oscillates less than LSQ weights | integer level: 3.000 % vs "
          "2.000 %; fixed grid: 0.600 % vs 2.000 % | depends on the definition (holds for "
          "the fixed grid) |") in text
  assert "| Swin W2A2 | StatsQ oscillates less than LSQ" not in text  # no LSQ Swin
  assert ("| Swin W3A3 | QKR reduces q/k oscillation: W_q, W_k on StatsQ's grid (QKR, "
          "implied) vs StatsQ's rounded W_q, W_k | integer level: 1.000 % vs 4.000 %; fixed "
          "grid: 1.000 % vs 0.800 % | depends on the definition (holds for the integer "
          "level) |") in text
  assert ("| DeiT W2A2 | CGA on W_qk stops W_qk oscillating (include_qk < reference CGA, qk) "
          "| integer level: 0.100 % vs 5.000 %; fixed grid: 0.100 % vs 5.000 % | agrees |"
          ) in text
  assert "| DeiT W2A2 | CGA improves top-1 (OFQ > StatsQ+QKR) | 92.00 % vs 90.00 % | agrees |" \
      in text
