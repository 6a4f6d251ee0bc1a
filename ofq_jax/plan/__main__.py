"""``python -m ofq_jax.plan --config=FILE[:args] --topology=v5e:4x4``: see ``ofq_jax.plan``.

Flags: ``--stages=qat,cga`` (default: every stage of the recipe with steps to run),
``--per_chip_batch=N`` (default: the recipe's per-GPU batch, ``quant.lsq_grad_batch``,
else ``batch_size`` over the devices), ``--fit`` (also the largest batch that fits),
``--json`` (the same numbers as one JSON object). Config overrides as in
``ofq_jax.main``: ``--config.model.quant.matmul=fake``. A bad topology, a batch the
mesh cannot split or a missing libtpu is one ``error:`` line (exit status 2).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from ofq_jax.cli_flags import parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=False)
flags.DEFINE_string("topology", None, "A TPU slice as libtpu names it: v5e:4x4, v5p:2x2x2, "
                    "v6e:2x2, v4:2x2x1; 2xv5e:4x4 for two slices.")
flags.DEFINE_list("stages", [], "Stages to plan (default: every stage with steps).")
flags.DEFINE_integer("per_chip_batch", None, "Images per device.")
flags.DEFINE_bool("fit", False, "Also find the largest per-device batch that fits HBM.")
flags.DEFINE_bool("json", False, "Print the plan as one JSON object.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from ofq_jax import target  # pylint: disable=import-outside-toplevel
  from ofq_jax.errors import UserError, one_line  # pylint: disable=import-outside-toplevel
  from ofq_jax.plan import planner, report  # pylint: disable=import-outside-toplevel
  target.skip_absent_tpu()  # a plan compiles for TPUs through libtpu, never runs on one
  log = (lambda text: print(text, file=sys.stderr, flush=True))
  try:
    result = planner.plan(FLAGS.config, FLAGS.topology, stage_names=FLAGS.stages or None,
                          per_chip_batch=FLAGS.per_chip_batch, fit=FLAGS.fit, log=log)
  except UserError as error:
    print(one_line(error), file=sys.stderr, flush=True)
    sys.exit(2)
  if FLAGS.json:
    print(json.dumps(report.as_dict(result), indent=1))
  else:
    print(report.as_text(result, _config_name(sys.argv)))


def _config_name(argv: list[str]) -> str:
  return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
