"""The paper's recipes planned for TPU pods (``ofq_jax.plan``), as one table.

  python bench/tpu_recipes.py                                   # every row, v5e:4x4 + v5p:2x2x2
  python bench/tpu_recipes.py --models small --bits 2 --topologies v5e:4x4 --float-baseline
  python bench/tpu_recipes.py --models tiny --bits 2 3 --json
  python bench/tpu_recipes.py --out rows.jsonl ...   # each recipe's rows as it finishes; a rerun skips them
  python bench/tpu_recipes.py --table rows.jsonl     # the table of rows already planned, no compiling
  python bench/tpu_recipes.py --models base swin_s swin_b --bits 2 --stages qat   # beyond the paper

Each row is one recipe (``configs/imagenet.py:model=...,bits=...``: QAT 310 epochs, then
CGA 30) on one topology at the recipe's per-GPU batch per chip: whether each stage fits
a chip's HBM (and how much it needs), XLA's FLOPs and HBM bytes per image, the roofline
utilisation and images/s per chip, the hours and chip-hours of the whole recipe, and
the compile time on this host. ``--float-baseline`` adds the float DeiT-S KD step (a
float student at ``precision='default'``, the same teacher, loss and AdamW: the QAT
stage with every layer float and standard attention), the step every quantized one is
judged against. Compile-only: no TPU, only libtpu (``pip install "ofq_jax[tpu]"``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT_STUDENT = {"model.quant.attention": "standard", "model.quant.rules": (".*=float",),
                 "model.precision": "default"}
"""The QAT stage's KD step with a float student (``--float-baseline``)."""


def recipe(model: str, bits: int, overrides: dict | None = None):
  spec = importlib.util.spec_from_file_location("imagenet_config",
                                                os.path.join(REPO, "configs", "imagenet.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"model={model},bits={bits}")
  for key, value in (overrides or {}).items():
    node, *path = [config] + key.split(".")
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value
  return config


def rows_of(label: str, model: str, bits: int, topology: str, plan) -> list[dict]:
  from ofq_jax.plan import report  # pylint: disable=import-outside-toplevel
  out = []
  for stage in report.as_dict(plan)["stages"]:
    roofline = stage["roofline"] or {}
    out.append({
        "row": label, "model": model, "bits": bits, "topology": topology,
        "stage": stage["stage"], "per_chip": stage["per_device_batch"],
        "fits": stage["memory"]["fits"], "hbm_gb": stage["memory"]["total"] / 1e9,
        "usable_gb": stage["memory"]["capacity"] / 1e9,
        "gflop_per_image": stage["flops_per_image"] / 1e9,
        "gb_per_image": stage["bytes_per_image"] / 1e9,
        "int8_share": stage["student_int8_share"],
        "utilisation": roofline.get("utilisation", float("nan")),
        "images_per_s_per_chip": stage["images_per_second_per_device"],
        "stage_hours": stage["hours"], "compile_s": stage["compile_seconds"],
        "refused": stage["refused"]})
  total = sum(r["stage_hours"] for r in out)
  for r in out:
    r["recipe_hours"] = total
    r["recipe_chip_hours"] = total * plan.topology.chips
  return out


def print_table(rows: list[dict]) -> None:
  print("| recipe | topology | stage | per chip | fits | HBM GB | GFLOP/img | GB/img | int8 % "
        "| util % | img/s/chip | recipe h | chip-h | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    fits = "yes" if r["fits"] else ("**no**" if not r["refused"] else "**no** (refused)")
    print(f"| {r['row']} | {r['topology']} | {r['stage']} | {r['per_chip']} | {fits} | "
          f"{r['hbm_gb']:.2f} / {r['usable_gb']:.2f} | {r['gflop_per_image']:.1f} | "
          f"{r['gb_per_image']:.3f} | {100 * r['int8_share']:.0f} | "
          f"{100 * r['utilisation']:.1f} | {r['images_per_s_per_chip']:,.0f} | "
          f"{r['recipe_hours']:,.0f} | {r['recipe_chip_hours']:,.0f} | {r['compile_s']:.0f} |",
          flush=True)


def read_rows(path: str) -> list[dict]:
  """The rows of a ``--out`` file (none when it does not exist yet)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=["tiny", "small", "swin_t"])
  parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
  parser.add_argument("--topologies", nargs="+", default=["v5e:4x4", "v5p:2x2x2"])
  parser.add_argument("--stages", nargs="*", default=None, help="default: the recipe's")
  parser.add_argument("--float-baseline", action="store_true")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--out", help="append each recipe's rows to this JSON-lines file as it "
                      "finishes, and skip the recipes it already holds (a Swin-T row compiles "
                      "for ~10 minutes on 2 cores: a long run survives being stopped)")
  parser.add_argument("--table", metavar="JSONL", help="print the table of a --out file and exit")
  args = parser.parse_args(argv)
  if args.table:
    rows = read_rows(args.table)
    if args.json:
      print(json.dumps({"rows": rows}))
    else:
      print_table(rows)
    return rows
  from ofq_jax import target  # pylint: disable=import-outside-toplevel
  from ofq_jax.plan import planner  # pylint: disable=import-outside-toplevel
  target.skip_absent_tpu()
  jobs = [(f"{m} W{b}A{b}", m, b, {}) for m in args.models for b in args.bits]
  if args.float_baseline:
    jobs.insert(0, ("small float (baseline)", "small", 2, FLOAT_STUDENT))
  rows, start = [], time.time()
  done = {(r["row"], r["topology"]) for r in read_rows(args.out)} if args.out else set()
  for topology in args.topologies:
    for label, model, bits, overrides in jobs:
      if (label, topology) in done:
        continue
      stages = ("qat",) if overrides else args.stages
      plan = planner.plan(recipe(model, bits, overrides), topology, stage_names=stages,
                          log=lambda text: print(text, file=sys.stderr, flush=True))
      new = rows_of(label, model, bits, topology, plan)
      rows += new
      if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
          f.writelines(json.dumps(r) + "\n" for r in new)
  if args.json:
    print(json.dumps({"rows": rows, "seconds": time.time() - start}))
  else:
    print_table(rows)
  return rows


if __name__ == "__main__":
  main()
