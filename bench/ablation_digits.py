"""The OFQ ablation on real data (scikit-learn digits): arch x method x bit-width x seed.

  python bench/ablation_digits.py --workdir=/tmp/ofq_ablation --out=RESULTS.md --jobs=2

For every seed and architecture (``deit``: the digits DeiT; ``swin``: the tiny digits
Swin) it trains the float model once (``method=float``), then from it, per bit-width,
the quantized methods of ``ofq_jax.methods``: ``lsq`` (LSQ weights and activations;
DeiT only, the reference has no LSQ-weight Swin), ``statsq``, ``ofq`` (StatsQ + QKR +
CGA) and ``ofq_qk`` (the same, with ``cga.include_qk``: CGA also anneals QKR's W_qk
product, resumed from the ``ofq`` run's QAT checkpoint). ``statsq_qkr`` is read from the
``ofq`` run's QAT stage: the same computation stopped before CGA. Every run is
``python -m ofq_jax.main --config=configs/digits.py:arch=A,method=M,bits=B,seed=S`` in
its own directory; the numbers come from its ``summary.json`` and the last tracked
record of each stage in its ``metrics.jsonl``.

Writes ``--out`` (markdown): per architecture and bit-width, top-1 and the share of
oscillating b-bit weights under both flip definitions (integer level; fixed grid),
the same per module type (``qk``, ``qk_implied``, ``v``, ``proj``, ``fc1``, ``fc2``,
``reduction``), and every paper claim checked under each definition (agrees /
disagrees / depends on the definition). ``results.json`` in ``--workdir`` keeps every
run's numbers. Finished runs in ``--workdir`` are reused, so an interrupted ablation
resumes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("deit", "swin")
DEFINITIONS = {"osc": "integer level", "osc_grid": "fixed grid"}
GROUPS = ("qk", "qk_implied", "v", "proj", "fc1", "fc2", "reduction")
"""The b-bit module types reported (the 8-bit patch embedding and heads are left out)."""
TRAINED = {"deit": ("lsq", "statsq", "ofq"), "swin": ("statsq", "ofq")}
"""Methods trained from the float model; ``ofq_qk`` resumes from ``ofq``'s QAT."""
LABELS = {"float": "float (teacher)", "lsq": "LSQ baseline (LSQ weights + acts)",
          "statsq": "StatsQ", "statsq_qkr": "StatsQ + QKR",
          "ofq": "StatsQ + QKR + CGA (OFQ)", "ofq_qk": "OFQ + CGA on W_qk (cga.include_qk)"}


def methods(arch: str) -> tuple[str, ...]:
  """The table rows of ``arch``, in order."""
  return ("float",) + tuple(m for m in ("lsq", "statsq", "statsq_qkr", "ofq", "ofq_qk")
                            if m in TRAINED[arch] or m in ("statsq_qkr", "ofq_qk"))


@dataclasses.dataclass
class Run:
  arch: str
  method: str
  bits: int
  seed: int
  workdir: pathlib.Path
  args: list[str]

  @property
  def key(self) -> tuple[str, str, int, int]:
    return (self.arch, self.method, self.bits, self.seed)

  @property
  def summary_path(self) -> pathlib.Path:
    return self.workdir / "summary.json"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/ofq_ablation", help="one folder per run")
  parser.add_argument("--out", default=str(REPO / "RESULTS.md"), help="markdown report")
  parser.add_argument("--archs", default="deit,swin", help="comma-separated: deit, swin")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated (>= 3 for std)")
  parser.add_argument("--bits", default="2", help="comma-separated bit-widths (2, 3, 4)")
  parser.add_argument("--float-epochs", type=int, default=30)
  parser.add_argument("--qat-epochs", type=int, default=20)
  parser.add_argument("--cga-epochs", type=int, default=5)
  parser.add_argument("--num-train-steps", type=int, default=-1,
                      help="> 0: every stage runs this many steps (smoke tests)")
  parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
  parser.add_argument("--extra", action="append", default=[],
                      help="more --config.KEY=VALUE overrides for every run")
  args = parser.parse_args(argv)
  args.archs = [a for a in args.archs.split(",") if a]
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.bits = [int(b) for b in args.bits.split(",") if b]
  if not args.seeds or not args.bits or not args.archs:
    parser.error("--archs, --seeds and --bits need at least one value each")
  unknown = sorted(set(args.archs) - set(ARCHS))
  if unknown:
    parser.error(f"--archs: {unknown} not in {ARCHS}")
  return args


def _overrides(args, **extra) -> list[str]:
  values = {"float.epochs": args.float_epochs, "qat.epochs": args.qat_epochs,
            "cga.epochs": args.cga_epochs, "num_train_steps": args.num_train_steps, **extra}
  return [f"--config.{k}={v}" for k, v in values.items()] + list(args.extra)


def plan(args) -> tuple[list[Run], list[Run], list[Run]]:
  """(float runs, quantized runs from a float model, CGA-on-W_qk runs from an ofq run's
  QAT checkpoint), each list runnable once the one before it is done."""
  root = pathlib.Path(args.workdir)
  floats, quantized, resumed = [], [], []
  for seed in args.seeds:
    for arch in args.archs:
      base = root / f"seed{seed}" / arch
      config = lambda method, bits=2: (f"--config=configs/digits.py:arch={arch},"
                                       f"method={method},bits={bits},seed={seed}")
      floats.append(Run(arch, "float", 0, seed, base / "float",
                        [config("float")] + _overrides(args)))
      teacher = base / "float" / "models" / "float"
      for bits in args.bits:
        for method in TRAINED[arch]:
          stages = "('qat','cga')" if method == "ofq" else "('qat',)"
          quantized.append(Run(arch, method, bits, seed, base / f"w{bits}a{bits}_{method}",
                               [config(method, bits)] + _overrides(
                                   args, stages=stages, **{"qat.teacher": teacher})))
        qat = base / f"w{bits}a{bits}_ofq" / "checkpoints" / "qat"
        resumed.append(Run(arch, "ofq_qk", bits, seed, base / f"w{bits}a{bits}_ofq_qk",
                           [config("ofq", bits)] + _overrides(
                               args, stages="('cga',)", **{"qat.teacher": teacher,
                                                           "cga.resume": qat,
                                                           "cga.include_qk": True})))
  return floats, quantized, resumed


def execute(run: Run) -> dict:
  """Runs (or reuses) one training run; returns its summary."""
  if run.summary_path.exists():
    summary = json.loads(run.summary_path.read_text())
    if not summary.get("preempted"):
      return dict(summary, reused=True)
  run.workdir.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-m", "ofq_jax.main", f"--workdir={run.workdir}"] + run.args
  with open(run.workdir / "log.txt", "w", encoding="utf-8") as log:
    result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            check=False)
  if result.returncode != 0:
    raise RuntimeError(f"run {run.arch} {run.method} w{run.bits} seed {run.seed} failed "
                       f"(exit {result.returncode}); see {run.workdir / 'log.txt'}. "
                       f"Command: {shlex.join(command)}")
  return json.loads(run.summary_path.read_text())


def stage_oscillation(workdir: pathlib.Path, bits: int) -> dict[str, dict[str, float]]:
  """Per stage, from the last tracked record of ``metrics.jsonl``: the oscillating share
  of the ``bits``-bit weights (``<def>/total``) and per module type (``<def>/<group>``),
  under each flip definition ``<def>`` (``osc``, ``osc_grid``)."""
  last = {}
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "osc/oscillating_fraction" in record:
        last[record["stage"]] = record
  out = {}
  for stage, record in last.items():
    values = {}
    for prefix in DEFINITIONS:
      total = record.get(f"{prefix}/oscillating_fraction_w{bits}")
      if total is not None:
        values[f"{prefix}/total"] = total
      for group in GROUPS:
        value = record.get(f"{prefix}/oscillating_fraction/group/{group}")
        if value is not None:
          values[f"{prefix}/{group}"] = value
    out[stage] = values
  return out


def run_all(runs: list[Run], jobs: int, done_before: int, total: int, start: float
            ) -> dict[tuple[str, str, int, int], dict]:
  results = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = {pool.submit(execute, run): run for run in runs}
    for future in concurrent.futures.as_completed(futures):
      run = futures[future]
      summary = future.result()
      if run.method != "float":
        summary["oscillation"] = stage_oscillation(run.workdir, run.bits)
      results[run.key] = summary
      done = done_before + len(results)
      elapsed = time.time() - start
      eta = elapsed / done * (total - done)
      print(f"[{done}/{total}] {run.arch} {run.method:<6} w{run.bits}a{run.bits} seed "
            f"{run.seed} done ({elapsed / 60:.1f} min elapsed, ETA {eta / 60:.1f} min)",
            flush=True)
  return results


# ----------------------------------------------------------------------------- numbers
def cell_values(results, arch: str, method: str, bits: int, seeds) -> dict[str, list[float]]:
  """Per-seed numbers of one table row: ``top1``, and ``<moment>:<def>/<what>`` with
  moment ``qat`` (end of QAT) or ``cga`` (after CGA), ``what`` = ``total`` or a group."""
  out: dict[str, list[float]] = {}
  for seed in seeds:
    if method == "float":
      out.setdefault("top1", []).append(results[(arch, "float", 0, seed)]["float_top1"])
      continue
    trained = {"statsq_qkr": "ofq"}.get(method, method)
    summary = results[(arch, trained, bits, seed)]
    top1 = summary["qat_top1"] if method in ("lsq", "statsq", "statsq_qkr") else \
        summary["cga_top1"]
    out.setdefault("top1", []).append(top1)
    stages = dict(summary.get("oscillation", {}))
    if method == "ofq_qk":  # its QAT is the ofq run's
      stages["qat"] = results[(arch, "ofq", bits, seed)]["oscillation"]["qat"]
    if method == "statsq_qkr":
      stages.pop("cga", None)
    for moment, values in stages.items():
      for key, value in values.items():
        out.setdefault(f"{moment}:{key}", []).append(value)
  return out


def collect(args, results) -> dict[tuple[str, int, str], dict[str, list[float]]]:
  return {(arch, bits, method): cell_values(results, arch, method, bits, args.seeds)
          for arch in args.archs for bits in args.bits for method in methods(arch)}


def _mean_std(values, scale=1.0, digits=2) -> str:
  values = [v * scale for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def _mean(values) -> float:
  return statistics.fmean(values) if values else math.nan


def _percent(row, key: str) -> str:
  return _mean_std(row[key], 100.0, 3) if row.get(key) else "n/a"


def totals_table(rows, arch: str, bits: int) -> list[str]:
  header = ["method", "top-1 %"] + [f"{what}, {DEFINITIONS[d]} %" for d in DEFINITIONS
                                     for what in ("end of QAT", "after CGA")]
  lines = [f"### {'Swin' if arch == 'swin' else 'DeiT'} W{bits}A{bits}: top-1 and "
           f"oscillating {bits}-bit weights", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for method in methods(arch):
    row = rows[(arch, bits, method)]
    cells = [_mean_std(row["top1"])]
    for prefix in DEFINITIONS:
      for moment in ("qat", "cga"):
        cells.append(_percent(row, f"{moment}:{prefix}/total") if method != "float" else "n/a")
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  return lines + [""]


def group_table(rows, arch: str, bits: int, prefix: str) -> list[str]:
  """Per module type, one definition: each method at the end of QAT, the CGA runs after
  CGA as well."""
  present = [g for g in GROUPS if any(rows[(arch, bits, m)].get(f"qat:{prefix}/{g}")
                                      for m in methods(arch))]
  lines = [f"#### Per module type, {DEFINITIONS[prefix]} (oscillating %)", "",
           "| method | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
  for method in methods(arch)[1:]:
    row = rows[(arch, bits, method)]
    moments = [("qat", "end of QAT")] if method != "ofq_qk" else []
    moments += [("cga", "after CGA")] if method in ("ofq", "ofq_qk") else []
    for moment, when in moments:
      cells = [_percent(row, f"{moment}:{prefix}/{g}") for g in present]
      lines.append(f"| {LABELS[method]}, {when} | " + " | ".join(cells) + " |")
  return lines + [""]


@dataclasses.dataclass(frozen=True)
class Claim:
  text: str
  oscillation: bool  # per definition, else on top-1
  left: tuple[str, str]  # (method, key) of the side the claim says is lower / higher
  right: tuple[str, str]
  lower: bool = True  # the claim is left < right (else left > right)
  archs: tuple[str, ...] = ARCHS


CLAIMS = (
    Claim("StatsQ oscillates less than LSQ weights", True, ("statsq", "qat:{d}/total"),
          ("lsq", "qat:{d}/total"), archs=("deit",)),
    Claim("QKR reduces q/k oscillation: W_q, W_k on StatsQ's grid (QKR, implied) vs "
          "StatsQ's rounded W_q, W_k", True, ("statsq_qkr", "qat:{d}/qk_implied"),
          ("statsq", "qat:{d}/qk")),
    Claim("QKR's rounded W_qk oscillates less than StatsQ's rounded W_q, W_k", True,
          ("statsq_qkr", "qat:{d}/qk"), ("statsq", "qat:{d}/qk")),
    Claim("QKR reduces oscillation overall (StatsQ+QKR < StatsQ)", True,
          ("statsq_qkr", "qat:{d}/total"), ("statsq", "qat:{d}/total")),
    Claim("CGA reduces oscillation (after CGA < end of QAT)", True, ("ofq", "cga:{d}/total"),
          ("ofq", "qat:{d}/total")),
    Claim("CGA on W_qk stops W_qk oscillating (include_qk < reference CGA, qk)", True,
          ("ofq_qk", "cga:{d}/qk"), ("ofq", "cga:{d}/qk")),
    Claim("OFQ beats the LSQ baseline (top-1)", False, ("ofq", "top1"), ("lsq", "top1"),
          lower=False, archs=("deit",)),
    Claim("CGA improves top-1 (OFQ > StatsQ+QKR)", False, ("ofq", "top1"),
          ("statsq_qkr", "top1"), lower=False),
    Claim("CGA on W_qk improves top-1 further (include_qk > OFQ)", False, ("ofq_qk", "top1"),
          ("ofq", "top1"), lower=False),
)


def judge(rows, claim: Claim, arch: str, bits: int) -> tuple[str, str] | None:
  """(measured, verdict) of one claim, or None when a side was not run."""
  def side(which, definition=""):
    method, key = which
    row = rows.get((arch, bits, method), {})
    return _mean(row.get(key.format(d=definition), []))
  holds = lambda a, b: a < b if claim.lower else a > b
  if not claim.oscillation:
    a, b = side(claim.left), side(claim.right)
    if math.isnan(a) or math.isnan(b):
      return None
    return f"{a:.2f} % vs {b:.2f} %", "agrees" if holds(a, b) else "**disagrees**"
  measured, verdicts = [], {}
  for prefix in DEFINITIONS:
    a, b = side(claim.left, prefix), side(claim.right, prefix)
    if math.isnan(a) or math.isnan(b):
      return None
    measured.append(f"{DEFINITIONS[prefix]}: {100 * a:.3f} % vs {100 * b:.3f} %")
    verdicts[prefix] = holds(a, b)
  if all(verdicts.values()):
    verdict = "agrees"
  elif not any(verdicts.values()):
    verdict = "**disagrees**"
  else:
    verdict = "depends on the definition (holds for the " + " and ".join(
        DEFINITIONS[p] for p, v in verdicts.items() if v) + ")"
  return "; ".join(measured), verdict


def claims(args, rows) -> list[str]:
  """Every paper claim, per architecture and bit-width, under each flip definition."""
  lines = ["## The paper's claims against these numbers", "",
           "Oscillation claims compare means of the b-bit weights' oscillating share "
           "(the module type named, or all b-bit weights), under both flip definitions; a "
           "claim holding under one only *depends on the definition*.", "",
           "| model | claim | measured | verdict |", "|---|---|---|---|"]
  for arch in args.archs:
    for bits in args.bits:
      for claim in CLAIMS:
        if arch not in claim.archs:
          continue
        judged = judge(rows, claim, arch, bits)
        if judged is not None:
          model = f"{'DeiT' if arch == 'deit' else 'Swin'} W{bits}A{bits}"
          lines.append(f"| {model} | {claim.text} | {judged[0]} | {judged[1]} |")
  return lines + [""]


def schedule_line(args) -> str:
  """The report's schedule: the ablation's own epochs, beside ``configs/digits.py``'s."""
  sys.path.insert(0, str(REPO / "configs"))
  try:
    import digits  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  config = digits.get_config("")
  return (
      f"- schedule (the ablation's own; `configs/digits.py` itself trains float "
      f"{config.float.epochs} / QAT {config.qat.epochs} / CGA {config.cga.epochs} epochs): "
      f"float {args.float_epochs} epochs; QAT {args.qat_epochs} epochs (+ the "
      f"config's cooldown) with KD from the seed's float model; CGA {args.cga_epochs} epochs "
      f"(OFQ runs only); batch 64; seeds {args.seeds}"
      + (f"; num_train_steps={args.num_train_steps} (smoke run)" if args.num_train_steps > 0
         else "") + ".")


def report(args, rows, results, wall: float, command: str) -> str:
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=False).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                         capture_output=True, text=True, check=False).stdout.strip()
  trained = sum(r.get("wall_seconds", 0.0) for r in results.values()) / 60
  reused = sum(1 for r in results.values() if r.get("reused"))
  lines = [
      "# OFQ ablation on scikit-learn digits", "",
      "Produced by `bench/ablation_digits.py` (do not edit by hand). Regenerate:", "",
      "<!-- docs: needs about 40 minutes of 2 CPU cores: the whole ablation -->",
      "```bash", command, "```", "",
      f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()} "
      f"{os.cpu_count()} CPU cores, {platform.system()}; commit {commit or '?'}"
      f"{' (uncommitted changes)' if dirty else ''}; wall time {wall / 60:.1f} min "
      f"({len(results)} runs, {trained:.1f} min of training summed over runs; {args.jobs} at "
      f"a time; {len(results) - reused} trained by this invocation"
      + (f", {reused} reused from the workdir, where an earlier invocation of the same "
         "command trained them" if reused else "") + ").",
      "- data: digits 8x8 images resized to 16 px, fixed stratified 80/20 split (1437 / 360 "
      "images); models (configs/digits.py): DeiT with embed 96, depth 4, 3 heads, patch 4; "
      "Swin with embed 48, depths 2-2, heads 2-4, window 4, patch 2.",
      schedule_line(args),
      "- top-1: held-out split, mean ± sample std over seeds. Oscillating weights: share of "
      "the b-bit weights whose oscillation EMA (momentum 0.01, tracked every step) exceeds "
      "0.005 (spec 4.5), at the end of QAT and after CGA, under two flip definitions: the "
      "**integer level** under the current scale (a StatsQ weight also flips when its "
      "channel's 2 mean|w| moves under it) and the level on a **fixed grid** frozen every "
      "100 steps (only the latent weight crossing a threshold flips it). Module types: "
      "`qk` = W_q and W_k (the q and k columns of the fused qkv kernel) for LSQ and "
      "StatsQ, the rounded W_q^T W_k product for QKR; `qk_implied` = QKR's W_q, W_k as "
      "StatsQ would round them (never rounded by the model; not in the totals).",
      "- StatsQ + QKR is the QAT stage of the OFQ run (the same computation before CGA); "
      "`OFQ + CGA on W_qk` resumes that QAT state with `cga.include_qk=True`.", "",
  ]
  for arch in args.archs:
    for bits in args.bits:
      lines += totals_table(rows, arch, bits)
      for prefix in DEFINITIONS:
        lines += group_table(rows, arch, bits, prefix)
  lines += claims(args, rows)
  lines += ["Every run's numbers: `results.json` in the ablation workdir; each run's "
            "metrics and plots are in its own folder there.", ""]
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  command = "python bench/ablation_digits.py " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  start = time.time()
  phases = plan(args)
  total = sum(len(p) for p in phases)
  print(f"{total} runs ({', '.join(str(len(p)) for p in phases)} float / quantized / "
        f"CGA on W_qk), {args.jobs} at a time; logs in {args.workdir}/seed*/*/*/log.txt",
        flush=True)
  results = {}
  for phase in phases:
    results.update(run_all(phase, args.jobs, len(results), total, start))
  rows = collect(args, results)
  pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
  with open(pathlib.Path(args.workdir) / "results.json", "w", encoding="utf-8") as f:
    json.dump({f"{a}/{m}/w{b}/seed{s}": v for (a, m, b, s), v in results.items()}, f,
              indent=2)
  text = report(args, rows, results, time.time() - start, command)
  out = pathlib.Path(args.out)
  tmp = out.with_suffix(out.suffix + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, out)  # never a half-written report
  print(text)


if __name__ == "__main__":
  main()
