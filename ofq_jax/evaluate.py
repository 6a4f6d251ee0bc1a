"""Evaluate a checkpoint on the config's eval split (top-1, top-5, images/s).

  python -m ofq_jax.evaluate --config=configs/imagenet.py:model=tiny,bits=2 --checkpoint=PATH \\
      --config.data.data_dir=$TFDS_DATA_DIR

``PATH`` may be an ofq_jax model directory (``workdir/models/<stage>``; QKR as ``W_q``,
``W_k`` or, after CGA with ``cga.include_qk``, as ``W_qk``), a timm / FB
DeiT file or a torchvision Swin file (float, by ``config.model.arch``) or a checkpoint of
the OFQ reference (e.g. the released ``.pth.tar``, quantized as ``config.model.quant``
says), or a packed integer file (``python -m ofq_jax.export``; run on its integers as
``load_integer`` runs it). Sharded like training: the
batch is split over the ``config.mesh`` devices and hosts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from ofq_jax import data as data_lib
from ofq_jax import export, sharding, target
from ofq_jax.checkpointing import load_fitting_model_dir
from ofq_jax.errors import MissingInputError, UserError, one_line
from ofq_jax.interop import load_ofq_torch, read_state_dict
from ofq_jax.interop import float_format, load_float
from ofq_jax.interop.names import REFERENCE_MARKERS
from ofq_jax.models import create_model, float_config, quantized_config
from ofq_jax.models.config import qk_form, quantized_configs
from ofq_jax.step import evaluate



def load_for_eval(path: str, model_config) -> tuple[nnx.Module, str]:
  """The model in ``path`` and what kind of file it was."""
  if not os.path.exists(path):
    raise MissingInputError(f"--checkpoint={path!r} does not exist; pass a model directory "
                            "(workdir/models/<stage>), a timm / FB DeiT file or an OFQ "
                            "reference .pth.tar.")
  if os.path.isdir(path):
    # Quantized in either W_qk form (CGA with cga.include_qk saves W_qk itself), then float.
    kinds = [(_quantized_kind(cfg), cfg) for cfg in quantized_configs(model_config)]
    kinds.append(("ofq_jax float", float_config(model_config)))
    return load_fitting_model_dir(path, [(kind, lambda c=cfg: create_model(c))
                                         for kind, cfg in kinds])
  if export.is_packed_file(path):
    return export.load_integer_model(path, model_config), "packed integer"
  state = read_state_dict(path)
  if any(key.endswith(REFERENCE_MARKERS) for key in state):
    return load_ofq_torch(state, quantized_config(model_config)), "OFQ reference"
  return load_float(state, model_config), float_format(model_config)


def _quantized_kind(config) -> str:
  return ("ofq_jax quantized (W_qk form)" if qk_form(config.quant) == "product"
          else "ofq_jax quantized")


def evaluate_checkpoint(config, checkpoint: str) -> dict[str, Any]:
  """Top-1 / top-5 (percent), image count and images/s of ``checkpoint``."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
  source = data_lib.build(config.data)
  model, kind = load_for_eval(checkpoint, config.model)
  # Buffers: the LSQ / StatsQ state, and a packed model's integers (FrozenLevels).
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, jax.tree.map(lambda _: sharding.replicated(mesh), params))
  buffers = jax.device_put(buffers,
                           jax.tree.map(lambda _: sharding.replicated(mesh), buffers))
  start = time.time()
  result = evaluate(graphdef, params, buffers, source, mesh, config.eval_batch_size)
  seconds = time.time() - start
  result.update(images_per_sec=result["count"] / max(seconds, 1e-9), checkpoint=checkpoint,
                kind=kind)
  return result


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.verbosity <= 0:
    logging.set_verbosity(logging.WARNING)
  target.skip_absent_tpu()
  try:
    result = evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint)
  except UserError as error:
    print(one_line(error), file=sys.stderr, flush=True)
    sys.exit(2)
  if jax.process_index() == 0:
    print(f"{result['kind']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['count']} images, {result['images_per_sec']:.1f} img/s)")
    print(json.dumps(result))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config (model, data, mesh).")
  flags.DEFINE_string("checkpoint", None, "Model directory, timm/FB file or OFQ .pth.tar.")
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
