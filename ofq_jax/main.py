"""Command line: ``python -m ofq_jax.main --config=configs/X.py[:args] --workdir=DIR``.

Every config field can be overridden with ``--config.<key>=value``. Multi-process
runs (TPU pods, GPU clusters) pass ``--distributed``: ``jax.distributed.initialize()``
then reads the cluster from the environment; ``--coordinator_address``,
``--num_processes`` and ``--process_id`` set it by hand (e.g. on CPU hosts).

A mistake in the config (a bad value, a missing file, a workdir holding another run)
prints one ``error: ...`` line and exits with status 2 before any work; status 143
means preempted (saved, rerun to resume).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ofq_jax.cli_flags import parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and summary.json go.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_string("cpu_collectives", None, "'gloo' for multi-process CPU runs.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster "
                  "auto-detected (TPU pods, SLURM, ...); implied by --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.verbosity <= 0:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; -v 1 shows it
  from ofq_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.keep_freed_memory_on_cpu()  # before jax starts its threads
  import jax  # pylint: disable=import-outside-toplevel
  from ofq_jax import target  # pylint: disable=import-outside-toplevel
  target.skip_absent_tpu()
  if FLAGS.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
  if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from ofq_jax import train  # pylint: disable=import-outside-toplevel
  from ofq_jax.errors import UserError, one_line  # pylint: disable=import-outside-toplevel
  try:
    FLAGS.config.keys()  # config_flags reports a config file it could not load only here
  except OSError as error:
    print(one_line(f"--config: {str(error).strip().splitlines()[-1].strip()}"),
          file=sys.stderr, flush=True)
    sys.exit(2)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as error:  # a traceback is for bugs
    print(one_line(error), file=sys.stderr, flush=True)
    sys.exit(2)
  if summary.get("preempted"):
    sys.exit(143)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
