"""The OFQ ablation on real data (scikit-learn digits): method x bit-width x seed.

  python bench/ablation_digits.py --workdir=/tmp/ofq_ablation --out=RESULTS.md

For every seed it trains the float model once (``method=float``), then from it, for
every bit-width, the quantized methods of ``ofq_jax.methods``: ``lsq`` (LSQ weights
and activations), ``statsq``, and ``ofq`` (StatsQ + QKR + CGA). ``statsq_qkr`` is read
from the ``ofq`` run's QAT stage: it is the same computation (same config, seed and
teacher) stopped before CGA, so it is not trained twice. Every run is
``python -m ofq_jax.main --config=configs/digits.py:method=M,bits=B,seed=S`` in its
own directory; the table numbers come from their ``summary.json``.

Writes ``--out`` (markdown: mean +- std top-1 and the share of oscillating weights at
the end of QAT and after CGA, one table per bit-width, the claims of the paper
checked against the numbers, the command) and ``results.json`` with every run's
numbers in ``--workdir``. Runs already finished in ``--workdir`` are reused, so an
interrupted ablation resumes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
QUANT_METHODS = ("lsq", "statsq", "statsq_qkr", "ofq")
TRAINED = ("lsq", "statsq", "ofq")  # statsq_qkr = the QAT stage of the ofq run


@dataclasses.dataclass
class Run:
  method: str
  bits: int
  seed: int
  workdir: pathlib.Path
  args: list[str]

  @property
  def summary_path(self) -> pathlib.Path:
    return self.workdir / "summary.json"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/ofq_ablation", help="one folder per run")
  parser.add_argument("--out", default=str(REPO / "RESULTS.md"), help="markdown report")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated (>= 3 for std)")
  parser.add_argument("--bits", default="2,3,4", help="comma-separated bit-widths")
  parser.add_argument("--float-epochs", type=int, default=30)
  parser.add_argument("--qat-epochs", type=int, default=20)
  parser.add_argument("--cga-epochs", type=int, default=5)
  parser.add_argument("--num-train-steps", type=int, default=-1,
                      help="> 0: every stage runs this many steps (smoke tests)")
  parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
  parser.add_argument("--extra", action="append", default=[],
                      help="more --config.KEY=VALUE overrides for every run")
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.bits = [int(b) for b in args.bits.split(",") if b]
  if not args.seeds or not args.bits:
    parser.error("--seeds and --bits need at least one value each")
  return args


def _overrides(args, **extra) -> list[str]:
  values = {"float.epochs": args.float_epochs, "qat.epochs": args.qat_epochs,
            "cga.epochs": args.cga_epochs, "num_train_steps": args.num_train_steps, **extra}
  return [f"--config.{k}={v}" for k, v in values.items()] + list(args.extra)


def plan(args) -> tuple[list[Run], list[Run]]:
  """(float runs, quantized runs); the latter start from their seed's float model."""
  root = pathlib.Path(args.workdir)
  floats, quantized = [], []
  for seed in args.seeds:
    float_dir = root / f"seed{seed}" / "float"
    floats.append(Run("float", 0, seed, float_dir, [
        f"--config=configs/digits.py:method=float,seed={seed}"] + _overrides(args)))
    teacher = float_dir / "models" / "float"
    for bits in args.bits:
      for method in TRAINED:
        stages = "('qat','cga')" if method == "ofq" else "('qat',)"
        config = f"--config=configs/digits.py:method={method},bits={bits},seed={seed}"
        quantized.append(Run(
            method, bits, seed, root / f"seed{seed}" / f"w{bits}a{bits}_{method}",
            [config] + _overrides(args, stages=stages, **{"qat.teacher": teacher})))
  return floats, quantized


def execute(run: Run) -> dict:
  """Runs (or reuses) one training run; returns its summary."""
  if run.summary_path.exists():
    summary = json.loads(run.summary_path.read_text())
    if not summary.get("preempted"):
      return summary
  run.workdir.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-m", "ofq_jax.main", f"--workdir={run.workdir}"] + run.args
  with open(run.workdir / "log.txt", "w", encoding="utf-8") as log:
    result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            check=False)
  if result.returncode != 0:
    raise RuntimeError(f"run {run.method} w{run.bits} seed {run.seed} failed (exit "
                       f"{result.returncode}); see {run.workdir / 'log.txt'}. Command: "
                       f"{shlex.join(command)}")
  return json.loads(run.summary_path.read_text())


def low_bit_fractions(run: Run) -> dict[str, float]:
  """Oscillating share over the run's ``bits``-bit tensors only (the 8-bit patch embedding
  and heads left out), at the end of each stage, from its ``metrics.jsonl``: the last
  record's per-tensor fractions weighted by tensor size."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ofq_jax.models import create_model, rounded  # pylint: disable=import-outside-toplevel
  from ofq_jax.recipes import digits_recipe  # pylint: disable=import-outside-toplevel
  config = digits_recipe(f"method={run.method},bits={run.bits}")
  config.model.quant.enabled = True
  model = create_model(config.model)
  modules = {tuple(p): m for p, m in nnx.iter_modules(model)}
  low_bit = [t for t in rounded.rounded_tensors(model) if t.bits == run.bits]
  sizes = {t.name: modules[t.path].value(t.attr).size for t in low_bit}
  low = list(sizes)
  last = {}
  with open(run.workdir / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "osc/oscillating_fraction" in record:
        last[record["stage"]] = record
  total = sum(sizes[n] for n in low)
  return {f"oscillating_fraction_low_bit_{stage}": sum(
      record[f"osc/oscillating_fraction/{n}"] * sizes[n] for n in low) / total
          for stage, record in last.items()}


def run_all(runs: list[Run], jobs: int, done_before: int, total: int, start: float
            ) -> dict[tuple[str, int, int], dict]:
  results = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = {pool.submit(execute, run): run for run in runs}
    for future in concurrent.futures.as_completed(futures):
      run = futures[future]
      summary = future.result()
      if run.method != "float":
        summary.update(low_bit_fractions(run))
      results[(run.method, run.bits, run.seed)] = summary
      done = done_before + len(results)
      elapsed = time.time() - start
      eta = elapsed / done * (total - done)
      print(f"[{done}/{total}] {run.method:<6} w{run.bits}a{run.bits} seed {run.seed} done "
            f"({elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min)", flush=True)
  return results


def collect(args, results) -> dict:
  """Per (bits, method): the per-seed numbers the tables are made of."""
  rows = {}
  for bits in args.bits:
    for method in ("float",) + QUANT_METHODS:
      top1, osc_qat, osc_cga, low_qat, low_cga = [], [], [], [], []
      for seed in args.seeds:
        if method == "float":
          top1.append(results[("float", 0, seed)]["float_top1"])
          continue
        summary = results[("ofq" if method == "statsq_qkr" else method, bits, seed)]
        top1.append(summary["cga_top1"] if method == "ofq" else summary["qat_top1"])
        osc_qat.append(summary["oscillating_fraction_qat"])
        low_qat.append(summary["oscillating_fraction_low_bit_qat"])
        if method == "ofq":
          osc_cga.append(summary["oscillating_fraction_cga"])
          low_cga.append(summary["oscillating_fraction_low_bit_cga"])
      rows[(bits, method)] = dict(top1=top1, osc_qat=osc_qat, osc_cga=osc_cga,
                                  low_qat=low_qat, low_cga=low_cga)
  return rows


def _mean_std(values, scale=1.0, digits=2) -> str:
  values = [v * scale for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def _mean(values) -> float:
  return statistics.fmean(values)


LABELS = {"float": "float (teacher)", "lsq": "LSQ baseline (LSQ weights + acts)",
          "statsq": "StatsQ", "statsq_qkr": "StatsQ + QKR",
          "ofq": "StatsQ + QKR + CGA (OFQ)"}


def table(args, rows, bits: int) -> list[str]:
  lines = [f"### W{bits}A{bits}", "",
           f"| method | top-1 % | oscillating {bits}-bit weights % (end of QAT) | "
           f"oscillating {bits}-bit weights % (after CGA) | oscillating, all quantized "
           "tensors % (end of QAT) | oscillating, all quantized tensors % (after CGA) |",
           "|---|---|---|---|---|---|"]
  for method in ("float",) + QUANT_METHODS:
    row = rows[(bits, method)]
    cells = [_mean_std(row["top1"])]
    for qat, cga in (("low_qat", "low_cga"), ("osc_qat", "osc_cga")):
      if method == "float":
        cells += ["n/a (no quantized weights)"] * 2
        continue
      cells.append(_mean_std(row[qat], 100.0, 3))
      cells.append(_mean_std(row[cga], 100.0, 3) if row[cga]
                   else "n/a (method has no CGA stage)")
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  return lines + [""]


def claims(args, rows) -> list[str]:
  """The paper's claims, each checked against the means measured here."""
  lines = ["## The paper's claims against these numbers", "",
           f"Oscillation claims use the {'/'.join(map(str, args.bits))}-bit weights' share "
           "(first two oscillation columns).", "",
           "| bits | claim | measured | verdict |", "|---|---|---|---|"]
  for bits in args.bits:
    m = {method: rows[(bits, method)] for method in ("float",) + QUANT_METHODS}
    checks = [
        ("StatsQ oscillates less than LSQ weights", _mean(m["statsq"]["low_qat"]),
         _mean(m["lsq"]["low_qat"]), "osc", lambda a, b: a < b),
        ("QKR reduces oscillation (StatsQ+QKR < StatsQ)", _mean(m["statsq_qkr"]["low_qat"]),
         _mean(m["statsq"]["low_qat"]), "osc", lambda a, b: a < b),
        ("CGA reduces oscillation (after CGA < end of QAT)", _mean(m["ofq"]["low_cga"]),
         _mean(m["ofq"]["low_qat"]), "osc", lambda a, b: a < b),
        ("OFQ beats the LSQ baseline (top-1)", _mean(m["ofq"]["top1"]),
         _mean(m["lsq"]["top1"]), "top1", lambda a, b: a > b),
        ("CGA improves top-1 (OFQ > StatsQ+QKR)", _mean(m["ofq"]["top1"]),
         _mean(m["statsq_qkr"]["top1"]), "top1", lambda a, b: a > b),
    ]
    for text, a, b, kind, holds in checks:
      unit = (lambda v: f"{100 * v:.3f} %") if kind == "osc" else (lambda v: f"{v:.2f} %")
      verdict = "agrees" if holds(a, b) else "**disagrees**"
      lines.append(f"| W{bits}A{bits} | {text} | {unit(a)} vs {unit(b)} | {verdict} |")
  return lines + [""]


def report(args, rows, results, wall: float, command: str) -> str:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=False).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                         capture_output=True, text=True, check=False).stdout.strip()
  lines = [
      "# OFQ ablation on scikit-learn digits", "",
      "Produced in one run by `bench/ablation_digits.py` (do not edit by hand). Regenerate:", "",
      "```", command, "```", "",
      f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()} "
      f"{os.cpu_count()} CPU cores, {platform.system()}; commit {commit or '?'}"
      f"{' (uncommitted changes)' if dirty else ''}; wall time {wall / 60:.1f} min "
      f"({len(results)} runs, {sum(r.get('wall_seconds', 0.0) for r in results.values()) / 60:.1f} "
      f"min of training summed over runs; {args.jobs} at a time).",
      "- data: digits 8x8 images resized to 16 px, fixed stratified 80/20 split (1437 / 360 "
      "images); model: DeiT with embed 96, depth 4, 3 heads, patch 4 (configs/digits.py).",
      f"- schedule: float {args.float_epochs} epochs; QAT {args.qat_epochs} epochs (+ the "
      f"config's cooldown) with KD from the seed's float model; CGA {args.cga_epochs} epochs "
      f"(OFQ only); batch 64; seeds {args.seeds}"
      + (f"; num_train_steps={args.num_train_steps} (smoke run)" if args.num_train_steps > 0
         else "") + ".",
      "- top-1: held-out split, mean ± sample std over seeds. Oscillating weights: share of "
      "entries whose oscillation EMA (momentum 0.01, tracked every step) exceeds 0.005 "
      "(spec 4.5), over the b-bit tensors of the transformer blocks (QKR's W_q^T W_k product "
      "counted in place of W_q and W_k), and over all quantized tensors (the 8-bit LSQ patch "
      "embedding and heads, identical in every method, included).",
      "- StatsQ + QKR is the QAT stage of the OFQ run (the same computation before CGA).", "",
  ]
  for bits in args.bits:
    lines += table(args, rows, bits)
  lines += claims(args, rows)
  lines += ["Every run's numbers: `results.json` in the ablation workdir; each run's "
            "metrics and plots are in its own folder there.", ""]
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  command = "python bench/ablation_digits.py " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  start = time.time()
  floats, quantized = plan(args)
  total = len(floats) + len(quantized)
  print(f"{total} runs ({len(floats)} float, {len(quantized)} quantized), "
        f"{args.jobs} at a time; logs in {args.workdir}/seed*/*/log.txt", flush=True)
  results = run_all(floats, args.jobs, 0, total, start)
  results.update(run_all(quantized, args.jobs, len(floats), total, start))
  rows = collect(args, results)
  pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
  with open(pathlib.Path(args.workdir) / "results.json", "w", encoding="utf-8") as f:
    json.dump({f"{m}/w{b}/seed{s}": v for (m, b, s), v in results.items()}, f, indent=2)
  text = report(args, rows, results, time.time() - start, command)
  out = pathlib.Path(args.out)
  tmp = out.with_suffix(out.suffix + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, out)  # never a half-written report
  print(text)


if __name__ == "__main__":
  main()
