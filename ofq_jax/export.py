"""Packed integer export: a quantized model as integers, to deploy.

  python -m ofq_jax.export --config=configs/digits.py --checkpoint=WORKDIR/models/cga \\
      --out=/tmp/deit_w2a2.safetensors

``export_integer(model, path)`` writes every rounded tensor of the model (the walk of
``ofq_jax.models.rounded``) as packed unsigned codes — 2-bit: 4 per byte, 3- and 4-bit:
2 per byte, 5- to 8-bit: 1 per byte — with its per-channel unit (``tensor = unit *
integer``), and every other array (LSQ steps, move biases, biases, norms, embeddings,
the image quantizer's sign) as it is; no latent float weight (and none of the ``W_q``,
``W_k`` behind QKR's product, nor the latent ``W_qk`` of its product form) is written, so
a model that CGA trained with ``cga.include_qk`` exports like any other. The container is
safetensors; its metadata holds the format version, the model config and each tensor's
code layout.

``load_integer(path)`` rebuilds the model with those integers fixed (``RoundsTensors.
freeze``) and returns a jitted ``images_nhwc -> logits`` function that runs its matmuls
on the integer levels (``model.quant.matmul='integer'``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ofq_jax.errors import MissingInputError, UserError
from ofq_jax.models import create_model
from ofq_jax.models.config import qk_form, quantized_configs, stored_model_differences
from ofq_jax.models.rounded import RoundedTensor, rounded_tensors
from ofq_jax.paths import dotted, state_path

FORMAT = "ofq_jax.packed-integer/1"
CODES_PER_BYTE = {2: 4, 3: 2, 4: 2}  # other bit-widths: one code per byte


def _integer_code(tensor: RoundedTensor) -> tuple[int, int]:
  """``(lowest integer, stride)``: code ``c`` stands for ``lowest + stride * c``. StatsQ's
  integers are the odd ``2k + 1``; LSQ's are its levels."""
  lo, _ = tensor.rounding.level_range
  return lo, 2 if tensor.method == "statsq" else 1


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned ``bits``-bit codes -> bytes, little end first (the last byte zero-padded)."""
  per_byte = CODES_PER_BYTE.get(bits, 1)
  width = 8 // per_byte
  flat = np.asarray(codes, np.uint8).reshape(-1)
  flat = np.concatenate([flat, np.zeros((-flat.size) % per_byte, np.uint8)])
  groups = flat.reshape(-1, per_byte).astype(np.uint16)
  shifts = np.arange(per_byte, dtype=np.uint16) * width
  return np.sum(groups << shifts, axis=1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """The inverse of ``pack``: ``count`` codes."""
  per_byte = CODES_PER_BYTE.get(bits, 1)
  width = 8 // per_byte
  shifts = np.arange(per_byte, dtype=np.uint8) * width
  codes = (np.asarray(packed, np.uint8)[:, None] >> shifts) & np.uint8((1 << width) - 1)
  return codes.reshape(-1)[:count]


def _modules(model: nnx.Module) -> dict[tuple, nnx.Module]:
  return {tuple(path): module for path, module in nnx.iter_modules(model)}


def _latent_names(tensors: tuple[RoundedTensor, ...], modules) -> set[str]:
  """The parameters behind the rounded tensors (and LSQ weight steps): not exported."""
  names = set()
  for t in tensors:
    declaration = modules[t.path].declaration(t.attr)
    for attr in (declaration.param,) + declaration.sources:
      if attr:
        names.add(dotted(t.path + (attr,)))
    if declaration.holder:
      names.add(dotted(t.path + (declaration.holder, "step")))
  return names


def export_integer(model: nnx.Module, path: str | os.PathLike[str]) -> dict[str, int]:
  """Writes ``model`` (quantized) as packed integers to ``path``; returns byte counts."""
  tensors = rounded_tensors(model)
  if not tensors:
    raise UserError("export_integer: the model rounds no tensor (model.quant.enabled is "
                    "off); export a quantized model.")
  modules = _modules(model)
  arrays, layout = {}, {}
  for t in tensors:
    module = modules[t.path]
    value = np.asarray(module.rounded(t.attr), np.float64)
    unit = np.asarray(module.weight_unit(t.attr), np.float64)
    integers = np.round(value / unit).astype(np.int64)
    lo, stride = _integer_code(t)
    codes = (integers - lo) // stride
    if np.any(codes < 0) or np.any(codes >= 2 ** t.bits) or np.any((integers - lo) % stride):
      raise AssertionError(f"{t.name}: integers outside the {t.bits}-bit grid")
    arrays[f"{t.name}.codes"] = pack(codes, t.bits)
    arrays[f"{t.name}.unit"] = np.asarray(unit, np.float32)
    layout[t.name] = dict(bits=t.bits, lo=lo, stride=stride, shape=list(integers.shape))
  latent = _latent_names(tensors, modules)
  for keypath, value in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
    name = dotted(state_path(keypath))
    if name not in latent:
      arrays[name] = np.asarray(value)
  metadata = {"format": FORMAT, "config": model.config.to_json(), "layout": json.dumps(layout)}
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tmp = f"{os.fspath(path)}.tmp"
  save_file(arrays, tmp, metadata=metadata)
  os.replace(tmp, path)
  packed = sum(a.nbytes for k, a in arrays.items() if k.endswith(".codes"))
  return {"bytes": os.path.getsize(path), "packed_weight_bytes": packed,
          "other_bytes": sum(a.nbytes for a in arrays.values()) - packed}


def is_packed_file(path: str | os.PathLike[str]) -> bool:
  """Whether ``path`` is a packed integer file (of any format version): a safetensors
  file whose metadata names this exporter."""
  if not os.path.isfile(path):
    return False
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(os.fspath(path), framework="numpy") as f:
      return (f.metadata() or {}).get("format", "").startswith(FORMAT.split("/")[0] + "/")
  except Exception:  # pylint: disable=broad-except  (not safetensors: read_state_dict says so)
    return False


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  if not os.path.exists(path):
    raise MissingInputError(f"{os.fspath(path)!r} does not exist; make it with "
                            "python -m ofq_jax.export --out=FILE.")
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(os.fspath(path), framework="numpy") as f:
      metadata = f.metadata() or {}
      arrays = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as error:  # pylint: disable=broad-except
    raise UserError(f"{os.fspath(path)} is not a safetensors file ({error}).") from None
  if metadata.get("format") != FORMAT:
    raise UserError(f"{os.fspath(path)} has format {metadata.get('format')!r}; this ofq_jax "
                    f"reads {FORMAT!r} (re-export it with this version).")
  return arrays, metadata


def _check_config(stored: ml_collections.ConfigDict, expected: ml_collections.ConfigDict,
                  path) -> None:
  # A packed model is quantized whatever a training config's float stage says, its matmul
  # settings are the loader's choice, and it stores QKR's rounded product, not the form
  # W_qk was trained in (``STORAGE_BLIND_KEYS``).
  diff = stored_model_differences(stored, expected)
  if diff:
    raise UserError(f"{os.fspath(path)} holds another model: {'; '.join(diff)}.")


def load_integer_model(path: str | os.PathLike[str], config: ml_collections.ConfigDict
                       | None = None, *, matmul: str = "integer") -> nnx.Module:
  """The model in ``path`` with its integers fixed. ``config``, when given, must describe
  the same model (the matmul settings aside)."""
  arrays, metadata = _read(path)
  stored = ml_collections.ConfigDict(json.loads(metadata["config"]))
  if config is not None:
    _check_config(stored, config, path)
  stored.quant.matmul = matmul
  model = create_model(stored)
  modules = _modules(model)
  layout = json.loads(metadata["layout"])
  tensors = rounded_tensors(model)
  for t in tensors:
    spec = layout[t.name]
    count = int(np.prod(spec["shape"]))
    codes = unpack(arrays[f"{t.name}.codes"], spec["bits"], count).astype(np.int32)
    integers = (spec["lo"] + spec["stride"] * codes).reshape(spec["shape"])
    modules[t.path].freeze(t.attr, jnp.asarray(integers, jnp.int16),
                           jnp.asarray(arrays[f"{t.name}.unit"]))
  latent = _latent_names(tensors, modules)
  state = nnx.state(model)
  def fill(keypath, current):
    name = dotted(state_path(keypath))
    if name in latent or name.split(".")[-1].startswith("frozen_"):
      return current
    if name not in arrays or arrays[name].shape != np.shape(current):
      raise UserError(f"{os.fspath(path)}: {name} is missing or mis-shaped; the file does not "
                      "match its own config (re-export it).")
    return jnp.asarray(arrays[name])
  nnx.update(model, jax.tree_util.tree_map_with_path(fill, state))
  return model


def load_integer(path: str | os.PathLike[str], config: ml_collections.ConfigDict | None = None
                 ) -> Callable[[jax.Array], jax.Array]:
  """A jitted ``images_nhwc -> logits`` (eval mode) of the packed model in ``path``."""
  graphdef, state = nnx.split(load_integer_model(path, config))
  forward = jax.jit(lambda s, images: nnx.merge(graphdef, s)(images, train=False))
  return lambda images: forward(state, images)


def load_quantized_dir(directory: str, model_config: ml_collections.ConfigDict) -> nnx.Module:
  """The quantized model in ``directory`` (``workdir/models/<stage>``), QKR holding W_q and
  W_k or, after CGA with ``cga.include_qk``, W_qk (the form the directory's state has)."""
  from ofq_jax import checkpointing  # pylint: disable=import-outside-toplevel
  stored = checkpointing.model_dir_config(directory)
  if stored is not None and not stored.quant.enabled:
    raise UserError(f"{directory} holds a float model; export a quantized stage's directory "
                    "(workdir/models/qat or models/cga).")
  model, _ = checkpointing.load_fitting_model_dir(
      directory, [(f"qk_form={qk_form(c.quant)}", lambda c=c: create_model(c))
                  for c in quantized_configs(model_config)],
      what="a quantized model directory")
  return model


def main(argv: list[str]) -> None:
  """``--config --checkpoint --out``: a quantized model directory -> a packed file."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  config = flags.FLAGS.config
  if not os.path.isdir(flags.FLAGS.checkpoint):
    raise MissingInputError(f"--checkpoint={flags.FLAGS.checkpoint!r} is not a model "
                            "directory (workdir/models/qat or models/cga).")
  out_dir = os.path.dirname(os.path.abspath(flags.FLAGS.out))
  if not os.path.isdir(out_dir):
    raise MissingInputError(f"--out={flags.FLAGS.out!r}: the directory {out_dir!r} does not "
                            "exist; create it or write the file elsewhere.")
  model = load_quantized_dir(flags.FLAGS.checkpoint, config.model)
  sizes = export_integer(model, flags.FLAGS.out)
  print(f"{flags.FLAGS.out}: {sizes['bytes'] / 1e6:.2f} MB ({sizes['packed_weight_bytes'] / 1e6:.2f}"
        f" MB packed weights, {sizes['other_bytes'] / 1e6:.2f} MB other arrays)")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  from ml_collections import config_flags
  from ofq_jax.errors import one_line
  config_flags.DEFINE_config_file("config", None, "Training config (its model is exported).")
  flags.DEFINE_string("checkpoint", None, "A quantized model directory (workdir/models/<stage>).")
  flags.DEFINE_string("out", None, "The packed .safetensors file to write.")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])

  def _main(argv):
    from ofq_jax import target  # pylint: disable=import-outside-toplevel
    target.skip_absent_tpu()
    try:
      main(argv)
    except UserError as error:
      print(one_line(error), file=sys.stderr, flush=True)
      sys.exit(2)
  app.run(_main)
